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
}
