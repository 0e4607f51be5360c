//! Replaying history for investigations: the projections as they stood at a past moment.

use cairn_store::ResourceStore;
use cairn_tests::{Backend, Deployment};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

fn reading(patient: &str, value: u32) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
        "subject": {"reference": patient},
        "effectiveDateTime": "2026-11-28T09:00:00Z",
        "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    })
}

/// The replayed store's current version of an Observation: (version, value, deleted), or None.
fn current(dir: &Path, id: &str) -> Option<(u64, Option<u64>, bool)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let store = cairn_store::embedded::EmbeddedStore::open(dir.join("store/resources.redb")).unwrap();
        let v = store.current("Observation", id).await.unwrap()?;
        let value = v
            .resource
            .as_ref()
            .map(|r| serde_json::from_str::<Value>(r.get()).unwrap()["valueQuantity"]["value"].as_u64().unwrap());
        Some((v.version_id, value, v.deleted))
    })
}

#[test]
fn a_replay_shows_the_past_and_two_replays_are_identical() {
    let d = Deployment::new(Backend::Embedded);
    let server = d.start(&["--insecure-no-auth"]);
    let base = format!("{}/fhir", server.base_url);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r = http
                .post(format!("{base}/Observation"))
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
        }
    };
    // A client registered before the cut and disabled after it.
    let (client_id, _) = d.register_client("Investigated app", "system/Observation.rs");
    let (a, b, cut, d_id) = rt.block_on(async {
        let a = post(reading("Patient/r1", 100)).await;
        let b = post(reading("Patient/r2", 110)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let cut = cairn_events::Timestamp::now().to_rfc3339();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // After the cut: a changed, b deleted, a third reading.
        let mut changed = reading("Patient/r1", 200);
        changed["id"] = json!(a);
        let r = http
            .put(format!("{base}/Observation/{a}"))
            .header("content-type", "application/fhir+json")
            .body(changed.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(http.delete(format!("{base}/Observation/{b}")).send().await.unwrap().status(), 204);
        let d_id = post(reading("Patient/r1", 120)).await;
        (a, b, cut, d_id)
    });
    d.admin(&["client", "disable", "--client-id", &client_id]);

    // Two replays to the cut, while the server keeps serving: the past, and byte-identical stores.
    let out_dir = tempfile::tempdir().unwrap();
    let (r1, r2) = (out_dir.path().join("r1"), out_dir.path().join("r2"));
    for dir in [&r1, &r2] {
        let (status, out, err) = d.cairn(&["replay", "--until", &cut, "--into", dir.to_str().unwrap()]);
        assert!(status.success(), "{out}{err}");
        assert!(out.starts_with("replayed "), "{out}");
    }
    let manifest =
        |dir: &Path| -> Value { serde_json::from_slice(&std::fs::read(dir.join("replay.json")).unwrap()).unwrap() };
    let (m1, m2) = (manifest(&r1), manifest(&r2));
    assert_eq!(m1["store_digest"], m2["store_digest"], "two replays to one moment give one store");
    assert_eq!(m1["cut"], m2["cut"]);
    let (status, digest, err) = cairn_tests::run_cairn(&["store", "digest", "--data-dir", r1.to_str().unwrap()]);
    assert!(status.success(), "{err}");
    assert_eq!(digest.trim(), m1["store_digest"].as_str().unwrap(), "the manifest names the store's digest");
    assert_eq!(current(&r1, &a), Some((1, Some(100), false)), "a as it was before its update");
    assert_eq!(current(&r1, &b), Some((1, Some(110), false)), "b not deleted yet");
    assert_eq!(current(&r1, &d_id), None, "the third reading did not exist yet");
    // The authorization state as it stood: the client registered, not yet disabled; no secret in it.
    let auth: Value = serde_json::from_slice(&std::fs::read(r1.join("auth-state.json")).unwrap()).unwrap();
    let client = auth["clients"].as_array().unwrap().iter().find(|c| c["client_id"] == client_id.as_str()).unwrap();
    assert_eq!(client["disabled"], false, "{client}");
    assert!(!auth.to_string().contains("secret"), "{auth}");
    assert!(auth["keys"].as_array().unwrap().iter().any(|k| k["purpose"] == "log_seal"));
    assert_eq!(m1["auth_state_sha256"], m2["auth_state_sha256"]);

    // Up to and including the update's record: a changed, b not yet deleted.
    let (status, tail, err) = d.cairn(&["log", "tail", "--topic", "cairn.fhir"]);
    assert!(status.success(), "{err}");
    let update = tail
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["event"]["type"] == "fhir.resource.updated")
        .expect("the update's event");
    let position = format!("cairn.fhir:{}:{}", update["partition"], update["offset"]);
    let r3 = out_dir.path().join("r3");
    let (status, out, err) = d.cairn(&["replay", "--until", &position, "--into", r3.to_str().unwrap()]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(current(&r3, &a), Some((2, Some(200), false)));
    assert_eq!(current(&r3, &b), Some((1, Some(110), false)));
    // Replayed up to now, the client is disabled.
    let now = out_dir.path().join("now");
    let (status, out, err) =
        d.cairn(&["replay", "--until", &cairn_events::Timestamp::now().to_rfc3339(), "--into", now.to_str().unwrap()]);
    assert!(status.success(), "{out}{err}");
    let auth: Value = serde_json::from_slice(&std::fs::read(now.join("auth-state.json")).unwrap()).unwrap();
    let client = auth["clients"].as_array().unwrap().iter().find(|c| c["client_id"] == client_id.as_str()).unwrap();
    assert_eq!(client["disabled"], true, "{client}");

    // Bad input: one line each, and an existing replay is never overwritten.
    let (status, _, err) =
        d.cairn(&["replay", "--until", "yesterday", "--into", out_dir.path().join("r4").to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("neither an RFC 3339 time") && err.lines().count() == 1, "{err}");
    let (status, _, err) = d.cairn(&["replay", "--until", &cut, "--into", r1.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("already holds") && err.lines().count() == 1, "{err}");
    assert_eq!(manifest(&r1), m1, "untouched");
    let (status, _, err) =
        d.cairn(&["replay", "--until", "cairn.fhir:0:999999", "--into", out_dir.path().join("r5").to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("no record at offset 999999"), "{err}");
    assert!(server.terminate().0.success());

    // A replay writes its indexes once at the end, the live server one write at a time: the same
    // store either way.
    let all = out_dir.path().join("all");
    let (status, out, err) =
        d.cairn(&["replay", "--until", &cairn_events::Timestamp::now().to_rfc3339(), "--into", all.to_str().unwrap()]);
    assert!(status.success(), "{out}{err}");
    let (status, live_digest, err) = d.cairn(&["store", "digest"]);
    assert!(status.success(), "{err}");
    assert_eq!(live_digest.trim(), manifest(&all)["store_digest"].as_str().unwrap(), "replayed store = live store");
}

/// `cairn serve --read-only --store-dir R`: the past over FHIR, with the live server's tokens, every
/// access recorded in the live trail, writes refused, revocations followed.
#[test]
fn a_replay_is_served_read_only_and_every_access_is_recorded_live() {
    let d = Deployment::new(Backend::Embedded);
    let live = d.start(&[]);
    let (feeder_id, feeder_secret) = d.register_client("Feeder", "system/Observation.cruds");
    let (auditor_id, auditor_secret) = d.register_client("Compliance", "system/AuditEvent.rs");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let http = reqwest::Client::new();
    let token = |base: String, id: String, secret: String, scope: &'static str| {
        let http = http.clone();
        async move {
            let t: Value = http
                .post(format!("{base}/token"))
                .basic_auth(id, Some(secret))
                .form(&[("grant_type", "client_credentials"), ("scope", scope)])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            t["access_token"].as_str().unwrap().to_owned()
        }
    };
    let live_fhir = format!("{}/fhir", live.base_url);
    let (feeder, a, cut, b) = rt.block_on(async {
        let feeder =
            token(live.base_url.clone(), feeder_id.clone(), feeder_secret.clone(), "system/Observation.cruds").await;
        let post = |body: Value| {
            let (http, feeder, live_fhir) = (http.clone(), feeder.clone(), live_fhir.clone());
            async move {
                let r = http
                    .post(format!("{live_fhir}/Observation"))
                    .bearer_auth(feeder)
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
            }
        };
        let a = post(reading("Patient/v1", 100)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let cut = cairn_events::Timestamp::now().to_rfc3339();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut changed = reading("Patient/v1", 200);
        changed["id"] = json!(a);
        let r = http
            .put(format!("{live_fhir}/Observation/{a}"))
            .bearer_auth(&feeder)
            .header("content-type", "application/fhir+json")
            .body(changed.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let b = post(reading("Patient/v1", 120)).await;
        (feeder, a, cut, b)
    });
    let replays = tempfile::tempdir().unwrap();
    let r = replays.path().join("r");
    let (status, out, err) = d.cairn(&["replay", "--until", &cut, "--into", r.to_str().unwrap()]);
    assert!(status.success(), "{out}{err}");

    let view = cairn_tests::Server::start(d.data_dir(), &["--read-only", "--store-dir", r.to_str().unwrap()]);
    let view_fhir = format!("{}/fhir", view.base_url);
    rt.block_on(async {
        let get = |url: String, bearer: Option<String>| {
            let http = http.clone();
            async move {
                let mut req = http.get(url);
                if let Some(t) = bearer {
                    req = req.bearer_auth(t);
                }
                let resp = req.send().await.unwrap();
                let status = resp.status().as_u16();
                (status, resp.json::<Value>().await.unwrap_or(Value::Null))
            }
        };
        // The past, with the live server's token.
        let (status, body) = get(format!("{view_fhir}/Observation/{a}"), Some(feeder.clone())).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (body["valueQuantity"]["value"].as_u64(), body["meta"]["versionId"].as_str()),
            (Some(100), Some("1"))
        );
        let (status, _) = get(format!("{view_fhir}/Observation/{b}"), Some(feeder.clone())).await;
        assert_eq!(status, 404, "created after the cut");
        let (status, bundle) = get(format!("{view_fhir}/Observation?patient=Patient/v1"), Some(feeder.clone())).await;
        assert_eq!((status, bundle["entry"].as_array().map(Vec::len)), (200, Some(1)), "{bundle}");
        let (status, history) = get(format!("{view_fhir}/Observation/{a}/_history"), Some(feeder.clone())).await;
        assert_eq!((status, history["entry"].as_array().map(Vec::len)), (200, Some(1)));
        // Writes are refused; so is a request without a token.
        let resp = http
            .post(format!("{view_fhir}/Observation"))
            .bearer_auth(&feeder)
            .header("content-type", "application/fhir+json")
            .body(reading("Patient/v1", 1).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
        let outcome: Value = resp.json().await.unwrap();
        assert!(outcome["issue"][0]["diagnostics"].as_str().unwrap().contains("replay until"), "{outcome}");
        for method in [reqwest::Method::PUT, reqwest::Method::DELETE] {
            let resp = http
                .request(method.clone(), format!("{view_fhir}/Observation/{a}"))
                .bearer_auth(&feeder)
                .header("content-type", "application/fhir+json")
                .body(reading("Patient/v1", 1).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 405, "{method}");
        }
        // A batch's reads are answered; its writes are refused one by one; a transaction is refused.
        let bundle = |kind: &str| {
            json!({"resourceType": "Bundle", "type": kind, "entry": [
                {"request": {"method": "GET", "url": format!("Observation/{a}")}},
                {"request": {"method": "GET", "url": "Observation?patient=Patient/v1"}},
                {"resource": reading("Patient/v1", 1), "request": {"method": "POST", "url": "Observation"}},
            ]})
        };
        let post_bundle = |body: Value| {
            http.post(view_fhir.clone())
                .bearer_auth(&feeder)
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
        };
        let resp = post_bundle(bundle("batch")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let answer: Value = resp.json().await.unwrap();
        let entries = answer["entry"].as_array().unwrap();
        assert_eq!(entries[0]["response"]["status"], "200 OK", "{answer}");
        assert_eq!(entries[0]["resource"]["valueQuantity"]["value"], 100, "the version as of the cut");
        assert_eq!(entries[1]["resource"]["entry"].as_array().map(Vec::len), Some(1), "{answer}");
        assert!(entries[2]["response"]["status"].as_str().unwrap().starts_with("405"), "{answer}");
        let mut transaction = bundle("transaction");
        transaction["entry"].as_array_mut().unwrap().drain(..2);
        assert_eq!(post_bundle(transaction).await.unwrap().status(), 405);
        let (status, _) = get(format!("{view_fhir}/Observation/{a}"), None).await;
        assert_eq!(status, 401);
        // The investigations read the live log: the view sends them there.
        let (status, refusal) = get(
            format!("{view_fhir}/Patient/v1/$timeline?from=2026-01-01T00:00:00Z&to=2100-01-01T00:00:00Z"),
            Some(feeder.clone()),
        )
        .await;
        assert_eq!(status, 405, "{refusal}");
        // The statement says what works here: reading only.
        let (_, cs) = get(format!("{view_fhir}/metadata"), None).await;
        for resource in cs["rest"][0]["resource"].as_array().unwrap() {
            let codes: Vec<&str> =
                resource["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
            assert!(codes.contains(&"read"), "{codes:?}");
            assert!(!codes.iter().any(|c| ["create", "update", "delete"].contains(c)), "{codes:?}");
            assert!(resource.get("operation").is_none());
        }
        let system: Vec<&str> =
            cs["rest"][0]["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
        assert_eq!(system, ["batch", "history-system"], "batches of reads, no transactions");
        // No authorization server here: the live one issues tokens.
        assert_eq!(http.post(format!("{}/token", view.base_url)).send().await.unwrap().status(), 404);

        // Every access is in the live trail, naming the replay.
        let auditor =
            token(live.base_url.clone(), auditor_id.clone(), auditor_secret.clone(), "system/AuditEvent.rs").await;
        let (status, trail) = get(format!("{live_fhir}/AuditEvent?_count=1000"), Some(auditor)).await;
        assert_eq!(status, 200);
        let viewed: Vec<&Value> = trail["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["resource"])
            .filter(|e| e["entity"].to_string().contains("urn:cairn:replay-view"))
            .collect();
        let outcomes: Vec<(&str, &str)> = viewed
            .iter()
            .map(|e| (e["subtype"][0]["code"].as_str().unwrap_or(""), e["outcome"].as_str().unwrap_or("")))
            .collect();
        for expected in [("read", "0"), ("search-type", "0"), ("create", "4"), ("update", "4"), ("delete", "4")] {
            assert!(outcomes.contains(&expected), "{expected:?} not among {outcomes:?}");
        }
        let unauthenticated = viewed.iter().any(|e| e["outcomeDesc"].as_str().is_some_and(|d| d.contains("HTTP 401")));
        assert!(unauthenticated, "the refused token is recorded too");
        assert!(viewed.iter().all(|e| e["entity"].to_string().contains(&format!("replay until {cut}"))));

        // A revocation at the live server reaches the view within the revocation bound (5 s).
        d.admin(&["revoke", "--client", &feeder_id]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (status, _) = get(format!("{view_fhir}/Observation/{a}"), Some(feeder.clone())).await;
            if status == 401 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the view still admits a revoked token");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // The live server's socket takes a view's own access events only: not a forged event of another kind.
    let forged = cairn_events::sample_event(cairn_events::EventType::AuthUserCreated);
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    let request = json!({"log": {"op": "append", "records": [{
        "topic": "cairn.access", "key": b64(forged.partition_key().as_bytes()), "value": b64(&forged.canonical_bytes())
    }]}});
    let mut socket = std::os::unix::net::UnixStream::connect(d.data_dir().join("run/admin.sock")).unwrap();
    std::io::Write::write_all(&mut socket, format!("{request}\n").as_bytes()).unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(socket), &mut answer).unwrap();
    assert!(answer.contains("is not an access event"), "{answer}");
    assert!(view.terminate().0.success());
    assert!(live.terminate().0.success());
    // Without the live server there is no trail to record in: the view does not start.
    let (status, _, err) =
        d.cairn(&["serve", "--read-only", "--store-dir", r.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(!status.success());
    assert!(err.contains("start it first"), "{err}");
}
