//! The FHIR REST API over HTTP: every interaction, validation, search, conditional create, crash
//! safety and projection rebuild.

use cairn_tests::{Backend, Deployment, Server, run_cairn};
use serde_json::{Value, json};
use std::sync::Arc;

struct Client {
    http: reqwest::Client,
    base: String,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> String {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    }
}

impl Client {
    fn new(server: &Server) -> Client {
        Client { http: reqwest::Client::new(), base: format!("{}/fhir", server.base_url) }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.header("content-type", "application/fhir+json").body(b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Reply { status, headers, body }
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(reqwest::Method::GET, path, None, &[]).await
    }

    async fn post(&self, path: &str, resource: &Value) -> Reply {
        self.send(reqwest::Method::POST, path, Some(serde_json::to_vec(resource).unwrap()), &[]).await
    }

    async fn put(&self, path: &str, resource: &Value, headers: &[(&str, &str)]) -> Reply {
        self.send(reqwest::Method::PUT, path, Some(serde_json::to_vec(resource).unwrap()), headers).await
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn glucose(patient: &str, when: &str, mg_dl: f64, reading_id: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0", "display": "Glucose [Mass/volume] in Blood"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "device": {"reference": "Device/meter-1"},
        "identifier": [{"system": "urn:example:meter-1", "value": reading_id}],
        "effectiveDateTime": when,
        "valueQuantity": {"value": mg_dl, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
        "extension": [{"url": "http://example.org/fhir/StructureDefinition/meter-firmware", "valueString": "4.2.1"}]
    })
}

fn assert_outcome(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.body);
    assert!(r.body.to_string().contains(needle), "`{needle}` not in {}", r.body);
    assert!(r.header("content-type").starts_with("application/fhir+json"));
}

/// Events in the FHIR write topic of a deployment's log.
fn fhir_events(d: &Deployment) -> usize {
    events(d, "cairn.fhir").len()
}

/// Every event of a topic, parsed (`cairn log tail`, whichever backend).
fn events(d: &Deployment, topic: &str) -> Vec<Value> {
    let (status, out, err) = d.cairn(&["log", "tail", "--topic", topic]);
    assert!(status.success(), "{err}");
    out.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].clone()).collect()
}

/// Every event of a topic of an embedded log in `data`.
fn events_in(data: &std::path::Path, topic: &str) -> Vec<Value> {
    let (status, out, err) = run_cairn(&["log", "tail", "--data-dir", data.to_str().unwrap(), "--topic", topic]);
    assert!(status.success(), "{err}");
    out.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].clone()).collect()
}

fn server(backend: Backend) -> (Deployment, Server) {
    let d = Deployment::new(backend);
    let s = d.start(&["--insecure-no-auth"]);
    (d, s)
}

// The API suite, once per backend: `<test>::embedded` and `<test>::kafka_cassandra`.
cairn_tests::on_every_backend!(
    capability_statement_lists_what_works,
    create_read_update_vread_delete_and_history,
    prefer_return_minimal_and_operation_outcome,
    bad_input_gets_an_operation_outcome_and_appends_nothing,
    conditional_create_does_not_duplicate_resent_readings,
    search_by_patient_code_date_and_paging,
    transactions_are_all_or_nothing_and_resolve_references,
    batches_answer_each_entry,
    paging_stays_correct_under_concurrent_writes,
    reads_and_searches_leave_access_events,
    patients_and_devices_are_searchable,
    every_event_written_by_a_run_matches_its_schema,
    every_observation_search_parameter_and_date_prefix,
    history_at_shows_what_was_current,
    decimals_round_trip_as_written
);

fn capability_statement_lists_what_works(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let r = Client::new(&s).get("/metadata").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["fhirVersion"], "4.0.1");
        let obs = r.body["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["type"] == "Observation")
            .unwrap()
            .clone();
        let params: Vec<&str> =
            obs["searchParam"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        for p in ["patient", "code", "date", "value-quantity", "identifier", "_lastUpdated", "_asOf"] {
            assert!(params.contains(&p), "{p} missing");
        }
        assert_eq!(obs["conditionalCreate"], true);
        let system: Vec<&str> =
            r.body["rest"][0]["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
        assert_eq!(system, ["transaction", "batch", "history-system"]);
    });
}

fn create_read_update_vread_delete_and_history(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let c = Client::new(&s);
        let reading = glucose("p1", "2026-11-28T08:30:00+01:00", 104.0, "r-1");
        let created = c.post("/Observation", &reading).await;
        assert_eq!(created.status, 201, "{}", created.body);
        let id = created.body["id"].as_str().unwrap().to_owned();
        assert_eq!(created.header("etag"), "W/\"1\"");
        assert!(created.header("location").ends_with(&format!("/fhir/Observation/{id}/_history/1")));
        assert!(created.header("last-modified").ends_with("GMT"));
        assert_eq!(created.body["meta"]["versionId"], "1");

        // Read-your-writes, and the resource round-trips unchanged (extension included).
        let read = c.get(&format!("/Observation/{id}")).await;
        assert_eq!(read.status, 200);
        assert_eq!(read.body, created.body);
        let mut sent = reading.clone();
        sent["id"] = read.body["id"].clone();
        sent["meta"] = read.body["meta"].clone();
        assert_eq!(read.body, sent, "nothing added or lost besides id and meta");

        // Update with a stale version is refused; with the right one it succeeds.
        let mut changed = read.body.clone();
        changed["valueQuantity"]["value"] = json!(110);
        let stale = c.put(&format!("/Observation/{id}"), &changed, &[("if-match", "W/\"7\"")]).await;
        assert_outcome(&stale, 412, "If-Match");
        let updated = c.put(&format!("/Observation/{id}"), &changed, &[("if-match", "W/\"1\"")]).await;
        assert_eq!(updated.status, 200, "{}", updated.body);
        assert_eq!(updated.header("etag"), "W/\"2\"");
        assert_eq!(c.get(&format!("/Observation/{id}")).await.body["valueQuantity"]["value"], 110);
        assert_eq!(c.get(&format!("/Observation/{id}/_history/1")).await.body["valueQuantity"]["value"], json!(104.0));

        let mut wrong_id = changed.clone();
        wrong_id["id"] = json!("someone-else");
        assert_outcome(&c.put(&format!("/Observation/{id}"), &wrong_id, &[]).await, 400, "does not match");

        let deleted = c.send(reqwest::Method::DELETE, &format!("/Observation/{id}"), None, &[]).await;
        assert_eq!(deleted.status, 204);
        assert_outcome(&c.get(&format!("/Observation/{id}")).await, 410, "deleted");
        assert_eq!(c.get(&format!("/Observation/{id}/_history/2")).await.status, 200, "history is kept");
        assert_outcome(&c.get(&format!("/Observation/{id}/_history/3")).await, 410, "deletion");
        assert_outcome(&c.get(&format!("/Observation/{id}/_history/9")).await, 404, "no version 9");
        assert_outcome(&c.get("/Observation/does-not-exist").await, 404, "does not exist");

        let history = c.get(&format!("/Observation/{id}/_history")).await;
        assert_eq!(history.body["type"], "history");
        let methods: Vec<&str> = history.body["entry"].as_array().unwrap().iter().map(|e| e["request"]["method"].as_str().unwrap()).collect();
        assert_eq!(methods, vec!["DELETE", "PUT", "POST"]);
        let type_history = c.get("/Observation/_history?_count=10").await;
        assert_eq!(type_history.body["entry"].as_array().unwrap().len(), 3);
        let system_history = c.get("/_history").await;
        assert_eq!(system_history.body["total"], 3);

        // Update-as-create with a client-chosen id.
        let mut patient = json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Smith", "given": ["Ann"]}], "birthDate": "1970-03-04"});
        assert_eq!(c.put("/Patient/p1", &patient, &[]).await.status, 201);
        patient["gender"] = json!("female");
        assert_eq!(c.put("/Patient/p1", &patient, &[]).await.status, 200);
    });
}

fn prefer_return_minimal_and_operation_outcome(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let c = Client::new(&s);
        let body = serde_json::to_vec(&glucose("p1", "2026-11-28", 99.0, "r-m")).unwrap();
        let minimal =
            c.send(reqwest::Method::POST, "/Observation", Some(body.clone()), &[("prefer", "return=minimal")]).await;
        assert_eq!(minimal.status, 201);
        assert_eq!(minimal.body, Value::Null);
        assert!(!minimal.header("location").is_empty());
        let oo =
            c.send(reqwest::Method::POST, "/Observation", Some(body), &[("prefer", "return=OperationOutcome")]).await;
        assert_eq!(oo.body["resourceType"], "OperationOutcome");

        // In a batch or transaction the preference applies to each write entry: a gateway gets the
        // ids and versions without the bodies back. A read entry still carries its resource.
        let read_id = minimal.header("location").split('/').nth_back(2).unwrap().to_owned();
        for (kind, prefer) in [("batch", "return=minimal"), ("transaction", "return=OperationOutcome")] {
            let bundle = json!({"resourceType": "Bundle", "type": kind, "entry": [
                {"resource": glucose("p1", "2026-11-28", 101.0, &format!("r-{kind}-1")), "request": {"method": "POST", "url": "Observation"}},
                {"resource": glucose("p1", "2026-11-28", 102.0, &format!("r-{kind}-2")), "request": {"method": "POST", "url": "Observation"}},
            ]});
            let mut bundle = bundle;
            if kind == "batch" {
                bundle["entry"].as_array_mut().unwrap().push(json!({"request": {"method": "GET", "url": format!("Observation/{read_id}")}}));
            }
            let r = c.send(reqwest::Method::POST, "", Some(serde_json::to_vec(&bundle).unwrap()), &[("prefer", prefer)]).await;
            assert_eq!(r.status, 200, "{kind}: {}", r.body);
            let entries = r.body["entry"].as_array().unwrap();
            for e in &entries[..2] {
                assert_eq!(e["response"]["status"], "201 Created", "{kind}: {e}");
                assert!(e["response"]["location"].as_str().unwrap().starts_with("Observation/"), "{kind}: {e}");
                assert_eq!(e["response"]["etag"], "W/\"1\"", "{kind}: {e}");
                assert!(e.get("resource").is_none(), "{kind}: a {prefer} entry carries no resource: {e}");
                match prefer {
                    "return=OperationOutcome" => assert_eq!(e["response"]["outcome"]["resourceType"], "OperationOutcome"),
                    _ => assert!(e["response"].get("outcome").is_none(), "{e}"),
                }
            }
            if kind == "batch" {
                assert_eq!(entries[2]["resource"]["id"], read_id.as_str(), "a read entry keeps its resource");
            }
        }
        // The other write paths of a batch (an update, a conditional create that finds its match) answer
        // without the resource too; a refused entry still carries its OperationOutcome.
        let mut updated = glucose("p1", "2026-11-28", 98.0, "r-m");
        updated["id"] = json!(read_id);
        let mut invalid = glucose("p1", "2026-11-28", 1.0, "r-bad");
        invalid.as_object_mut().unwrap().remove("status");
        let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": updated, "request": {"method": "PUT", "url": format!("Observation/{read_id}")}},
            {"resource": glucose("p1", "2026-11-28", 101.0, "r-batch-1"),
             "request": {"method": "POST", "url": "Observation", "ifNoneExist": "identifier=urn:example:meter-1|r-batch-1"}},
            {"resource": invalid, "request": {"method": "POST", "url": "Observation"}},
        ]});
        let r = c
            .send(reqwest::Method::POST, "", Some(serde_json::to_vec(&bundle).unwrap()), &[("prefer", "return=minimal")])
            .await;
        let entries = r.body["entry"].as_array().unwrap();
        assert_eq!(entries[0]["response"]["status"], "200 OK", "{}", r.body);
        assert_eq!(entries[0]["response"]["etag"], "W/\"2\"", "{}", r.body);
        assert_eq!(entries[1]["response"]["status"], "200 OK", "the match is answered: {}", r.body);
        for e in &entries[..2] {
            assert!(e.get("resource").is_none(), "{e}");
        }
        assert_eq!(entries[2]["response"]["status"], "400", "{}", r.body);
        assert_eq!(entries[2]["response"]["outcome"]["resourceType"], "OperationOutcome", "{}", r.body);
        let stored = c.get("/Observation?identifier=urn:example:meter-1|r-batch-2").await;
        assert_eq!(stored.body["total"], 1, "a minimal answer still stores the entry: {}", stored.body);
    });
}

fn bad_input_gets_an_operation_outcome_and_appends_nothing(backend: Backend) {
    let d = Deployment::new(backend);
    let s = d.start(&["--insecure-no-auth", "--max-resource-bytes", "4096"]);
    rt().block_on(async {
        let c = Client::new(&s);
        let raw = |b: &[u8]| c.send(reqwest::Method::POST, "/Observation", Some(b.to_vec()), &[]);
        assert_outcome(&raw(b"{\"resourceType\":").await, 400, "malformed JSON");
        assert_outcome(&raw(&[0xff, 0xfe, 0x00]).await, 400, "UTF-8");
        assert_outcome(
            &raw(br#"{"resourceType":"Observation","status":"final","status":"final","code":{"text":"x"}}"#).await,
            400,
            "duplicate key",
        );
        assert_outcome(&c.post("/Observation", &json!({"resourceType": "Patient"})).await, 400, "does not match");
        let mut no_status = glucose("p1", "2026-11-28", 1.0, "x");
        no_status.as_object_mut().unwrap().remove("status");
        let r = c.post("/Observation", &no_status).await;
        assert_outcome(&r, 400, "Observation.status is required");
        assert_eq!(r.body["issue"][0]["expression"][0], "Observation.status");
        let mut bad_date = glucose("p1", "2026-02-30", 1.0, "x");
        bad_date["unknownThing"] = json!(true);
        let r = c.post("/Observation", &bad_date).await;
        assert_outcome(&r, 400, "effectiveDateTime");
        assert!(r.body.to_string().contains("unknown element `unknownThing`"));
        let mut huge = glucose("p1", "2026-11-28", 1.0, "x");
        huge["note"] = json!([{"text": "x".repeat(5000)}]);
        assert_outcome(&c.post("/Observation", &huge).await, 413, "limit");
        let wrong_type = c.send(reqwest::Method::POST, "/Observation", None, &[("content-type", "text/plain")]).await;
        assert_eq!(wrong_type.status, 415);
        assert_outcome(&c.post("/Medication", &json!({"resourceType": "Medication"})).await, 404, "not supported");
        assert_outcome(&c.send(reqwest::Method::PATCH, "/Observation/x", None, &[]).await, 405, "not allowed");
        assert_outcome(&c.get("/Observation?_format=xml").await, 406, "JSON only");
        assert_eq!(c.get("/Observation?_summary=count").await.body["total"], 0, "nothing was stored");
    });
    let (status, stderr) = s.terminate();
    assert!(status.success(), "{stderr}");
    assert_eq!(fhir_events(&d), 0, "no write event was appended");
}

#[test]
fn without_insecure_no_auth_the_api_refuses_anonymous_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &[]);
    rt().block_on(async {
        let c = Client::new(&s);
        assert_eq!(c.get("/metadata").await.status, 200);
        let r = c.get("/Observation").await;
        assert_outcome(&r, 401, "a bearer token is required");
        assert_eq!(r.header("www-authenticate"), "Bearer realm=\"cairn\"");
    });
    let (status, _, err) = run_cairn(&[
        "serve",
        "--data-dir",
        tmp.path().join("x").to_str().unwrap(),
        "--listen",
        "0.0.0.0:0",
        "--insecure-no-auth",
    ]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("loopback"), "{err}");
}

fn conditional_create_does_not_duplicate_resent_readings(backend: Backend) {
    let (d, s) = server(backend);
    rt().block_on(async {
        let c = Arc::new(Client::new(&s));
        let reading = glucose("p2", "2026-11-28T09:00:00Z", 120.0, "dup-1");
        let body = serde_json::to_vec(&reading).unwrap();
        let cond = [("if-none-exist", "identifier=urn:example:meter-1|dup-1")];
        let first = c.send(reqwest::Method::POST, "/Observation", Some(body.clone()), &cond).await;
        assert_eq!(first.status, 201);
        let again = c.send(reqwest::Method::POST, "/Observation", Some(body.clone()), &cond).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.body["id"], first.body["id"]);
        assert_eq!(again.header("etag"), "W/\"1\"");

        // Ten identical creates at once yield one resource.
        let racing = glucose("p2", "2026-11-28T09:05:00Z", 121.0, "race-1");
        let body = serde_json::to_vec(&racing).unwrap();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let c = c.clone();
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                c.send(
                    reqwest::Method::POST,
                    "/Observation",
                    Some(body),
                    &[("if-none-exist", "identifier=urn:example:meter-1|race-1")],
                )
                .await
            }));
        }
        let mut ids = std::collections::HashSet::new();
        let mut created = 0;
        for t in tasks {
            let r = t.await.unwrap();
            assert!(r.status == 201 || r.status == 200, "{}", r.body);
            created += (r.status == 201) as usize;
            ids.insert(r.body["id"].as_str().unwrap().to_owned());
        }
        assert_eq!((created, ids.len()), (1, 1));
        let found = c.get("/Observation?identifier=urn:example:meter-1|race-1").await;
        assert_eq!(found.body["total"], 1);
    });
    assert!(s.terminate().0.success());
    // The 200 answer disclosed the existing resource: it was audited as the search it is.
    let access = events(&d, "cairn.access");
    assert!(
        access.iter().any(|e| e["payload"]["query"] == "identifier=urn:example:meter-1|dup-1"
            && e["payload"]["returned"].as_array().unwrap().len() == 1),
        "{access:#?}"
    );
}

fn search_by_patient_code_date_and_paging(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let c = Client::new(&s);
        for day in 1..=20 {
            let when = format!("2026-11-{day:02}T07:00:00Z");
            assert_eq!(
                c.post("/Observation", &glucose("p3", &when, 90.0 + day as f64, &format!("s-{day}"))).await.status,
                201
            );
        }
        let mut other = glucose("p4", "2026-11-05T07:00:00Z", 5.5, "o-1");
        other["code"]["coding"][0]["code"] = json!("15074-8");
        other["valueQuantity"] =
            json!({"value": 5.5, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"});
        assert_eq!(c.post("/Observation", &other).await.status, 201);

        let total = |q: &str| {
            let q = q.to_owned();
            let c = &c;
            async move {
                let r = c.get(&format!("/Observation?{q}")).await;
                assert_eq!(r.status, 200, "{q}: {}", r.body);
                r.body["total"].as_u64().unwrap()
            }
        };
        assert_eq!(total("patient=p3").await, 20);
        assert_eq!(total("patient=Patient/p4").await, 1);
        assert_eq!(total("subject=Patient/p3&code=http://loinc.org|2339-0").await, 20);
        assert_eq!(total("code=15074-8").await, 1);
        assert_eq!(total("code=http://loinc.org|").await, 21);
        assert_eq!(total("patient=p3&date=ge2026-11-10&date=lt2026-11-15").await, 5);
        assert_eq!(total("patient=p3&date=2026-11-03").await, 1);
        assert_eq!(total("date=gt2026-11-19").await, 1);
        assert_eq!(total("value-quantity=gt105").await, 5);
        assert_eq!(total("value-quantity=5.5|http://unitsofmeasure.org|mmol/L").await, 1);
        assert_eq!(total("identifier=urn:example:meter-1|s-7,urn:example:meter-1|s-8").await, 2);
        assert_eq!(total("status=final&category=laboratory").await, 21);

        // Paging with next links, newest first.
        let mut seen = Vec::new();
        let mut url = "/Observation?patient=p3&_sort=-date&_count=6".to_owned();
        loop {
            let page = c.get(&url).await;
            for e in page.body["entry"].as_array().unwrap() {
                seen.push(e["resource"]["effectiveDateTime"].as_str().unwrap().to_owned());
            }
            let next = page.body["link"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["relation"] == "next")
                .map(|l| l["url"].as_str().unwrap().to_owned());
            match next {
                Some(n) => url = n.split("/fhir").nth(1).unwrap().to_owned(),
                None => break,
            }
        }
        assert_eq!(seen.len(), 20);
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.reverse();
        assert_eq!(seen, sorted);

        let count = c.get("/Observation?patient=p3&_summary=count").await;
        assert_eq!(count.body["total"], 20);
        assert!(count.body.get("entry").is_none());
        let elements = c.get("/Observation?patient=p4&_elements=status").await;
        let r = &elements.body["entry"][0]["resource"];
        assert!(r.get("valueQuantity").is_none() && r["status"] == "final");

        assert_outcome(&c.get("/Observation?colour=blue").await, 400, "colour");
        let lenient = c
            .send(reqwest::Method::GET, "/Observation?colour=blue&patient=p4", None, &[("prefer", "handling=lenient")])
            .await;
        assert_eq!(lenient.status, 200);
        assert_eq!(lenient.body["total"], 1);
        assert_outcome(&c.get("/Observation?date=2026-13-01").await, 400, "date");
    });
}

#[test]
fn acknowledged_writes_survive_sigkill_and_the_log_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &["--insecure-no-auth"]);
    let acked: Vec<String> = rt().block_on(async {
        let c = Arc::new(Client::new(&s));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for w in 0..8 {
            let c = c.clone();
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let r = c
                        .http
                        .post(format!("{}/Observation", c.base))
                        .header("content-type", "application/fhir+json")
                        .body(
                            serde_json::to_vec(&glucose("p9", "2026-11-28T10:00:00Z", 100.0, &format!("k-{w}-{i}")))
                                .unwrap(),
                        )
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 201 => {
                            let v: Value = r.json().await.unwrap();
                            let _ = tx.send(v["id"].as_str().unwrap().to_owned());
                        }
                        _ => break,
                    }
                }
            }));
        }
        drop(tx);
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        s.kill();
        for t in tasks {
            let _ = t.await;
        }
        let mut ids = Vec::new();
        while let Some(id) = rx.recv().await {
            ids.push(id);
        }
        ids
    });
    assert!(acked.len() > 10, "only {} writes acknowledged", acked.len());
    let s = Server::start(tmp.path(), &["--insecure-no-auth"]);
    rt().block_on(async {
        let c = Client::new(&s);
        for id in &acked {
            assert_eq!(c.get(&format!("/Observation/{id}")).await.status, 200, "acknowledged {id} lost");
        }
    });
    let (status, _) = s.terminate();
    assert!(status.success());
    let (status, out, _) = run_cairn(&["log", "verify", "--data-dir", tmp.path().to_str().unwrap()]);
    assert!(status.success(), "{out}");
}

#[test]
fn deleting_the_projection_rebuilds_it_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let s = Server::start(tmp.path(), &["--insecure-no-auth"]);
    rt().block_on(async {
        let c = Client::new(&s);
        for i in 0..30 {
            let r = c
                .post(
                    "/Observation",
                    &glucose(&format!("p{}", i % 4), "2026-11-28T10:00:00Z", 100.0 + i as f64, &format!("d-{i}")),
                )
                .await;
            let id = r.body["id"].as_str().unwrap().to_owned();
            if i % 3 == 0 {
                let mut v = r.body.clone();
                v["status"] = json!("amended");
                assert_eq!(c.put(&format!("/Observation/{id}"), &v, &[]).await.status, 200);
            }
            if i % 5 == 0 {
                assert_eq!(c.send(reqwest::Method::DELETE, &format!("/Observation/{id}"), None, &[]).await.status, 204);
            }
        }
    });
    assert!(s.terminate().0.success());
    let (status, before, err) = run_cairn(&["store", "digest", "--data-dir", dir]);
    assert!(status.success(), "{err}");
    std::fs::remove_dir_all(tmp.path().join("store")).unwrap();
    // The embedded server rebuilds every projection (resources and the audit trail) before it serves;
    // stopped again at once, the rebuilt store must be the same bytes.
    let s = Server::start(tmp.path(), &["--insecure-no-auth"]);
    assert!(s.terminate().0.success());
    let (_, after, _) = run_cairn(&["store", "digest", "--data-dir", dir]);
    assert_eq!(before, after);
    assert_eq!(before.trim().len(), 64);
    // A store whose value file lost records (cut short while stopped) is refused by the commands
    // that only read it, and rebuilt by the server, the same again.
    let values = tmp.path().join("store/resources.values");
    let len = std::fs::metadata(&values).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&values).unwrap().set_len(len / 2).unwrap();
    let (status, _, err) = run_cairn(&["store", "digest", "--data-dir", dir]);
    assert!(!status.success() && err.contains("damaged") && err.lines().count() == 1, "{err}");
    let s = Server::start(tmp.path(), &["--insecure-no-auth"]);
    assert!(s.terminate().0.success());
    let (_, again, _) = run_cairn(&["store", "digest", "--data-dir", dir]);
    assert_eq!(before, again);
    let s = Server::start(tmp.path(), &["--insecure-no-auth"]);
    rt().block_on(async {
        let c = Client::new(&s);
        assert_eq!(c.get("/Observation?_summary=count").await.body["total"], 30 - 6);
        // Reads before the stop are in the rebuilt trail too: the audit projections are in the digest.
        let trail = c.get("/AuditEvent?_summary=count").await;
        assert!(trail.body["total"].as_u64().is_some_and(|n| n >= 30 + 10 + 6), "{:?}", trail.body);
    });
    assert!(s.terminate().0.success());
}

fn transactions_are_all_or_nothing_and_resolve_references(backend: Backend) {
    let d = Deployment::new(backend);
    let s = d.start(&["--insecure-no-auth"]);
    rt().block_on(async {
        let c = Client::new(&s);
        let mut obs = glucose("placeholder", "2026-11-28T07:00:00Z", 101.0, "t-1");
        obs["subject"]["reference"] = json!("urn:uuid:6a1b0f1e-0000-4000-8000-000000000001");
        let mut obs2 = obs.clone();
        obs2["identifier"][0]["value"] = json!("t-2");
        let tx = json!({
            "resourceType": "Bundle", "type": "transaction",
            "entry": [
                {"fullUrl": "urn:uuid:6a1b0f1e-0000-4000-8000-000000000001",
                 "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "M-1"}], "name": [{"family": "Ngata"}]},
                 "request": {"method": "POST", "url": "Patient"}},
                {"resource": obs, "request": {"method": "POST", "url": "Observation"}},
                {"resource": obs2, "request": {"method": "POST", "url": "Observation"}}
            ]
        });
        let r = c.post("", &tx).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["type"], "transaction-response");
        let statuses: Vec<&str> = r.body["entry"].as_array().unwrap().iter().map(|e| e["response"]["status"].as_str().unwrap()).collect();
        assert_eq!(statuses, vec!["201 Created"; 3]);
        let patient_id = r.body["entry"][0]["resource"]["id"].as_str().unwrap().to_owned();
        assert_eq!(r.body["entry"][1]["resource"]["subject"]["reference"], format!("Patient/{patient_id}"));
        assert_eq!(c.get(&format!("/Observation?patient={patient_id}")).await.body["total"], 2);

        // A conditional reference resolves to the one match.
        let mut obs3 = glucose("x", "2026-11-28T08:00:00Z", 99.0, "t-3");
        obs3["subject"]["reference"] = json!("Patient?identifier=urn:mrn|M-1");
        let r = c.post("", &json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": obs3, "request": {"method": "POST", "url": "Observation"}}]})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["entry"][0]["resource"]["subject"]["reference"], format!("Patient/{patient_id}"));

        // An invalid entry fails the whole transaction: nothing from it becomes visible.
        let mut bad = glucose("x", "2026-11-28T09:00:00Z", 1.0, "t-bad");
        bad.as_object_mut().unwrap().remove("code");
        let good = glucose(&patient_id, "2026-11-28T09:00:00Z", 100.0, "t-good");
        let r = c.post("", &json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": good, "request": {"method": "POST", "url": "Observation"}},
            {"resource": bad, "request": {"method": "POST", "url": "Observation"}}
        ]})).await;
        assert_outcome(&r, 400, "Bundle.entry[1]");
        assert_eq!(c.get("/Observation?identifier=urn:example:meter-1|t-good").await.body["total"], 0);
        let r = c.post("", &json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": glucose("x", "2026-11-28", 1.0, "t-c"), "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "Observation"}, "request": {"method": "PUT", "url": "Observation/zz"}}
        ]})).await;
        assert_eq!(r.status, 400);
        assert_eq!(c.get("/Observation?identifier=urn:example:meter-1|t-c").await.body["total"], 0);
    });
    let (status, _) = s.terminate();
    assert!(status.success());
    assert_eq!(fhir_events(&d), 4, "only the two good transactions were appended");
}

fn batches_answer_each_entry(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let c = Client::new(&s);
        let mut entries: Vec<Value> = (0..100)
            .map(|i| json!({"resource": glucose("pb", "2026-11-28T10:00:00Z", 80.0 + i as f64, &format!("b-{i}")), "request": {"method": "POST", "url": "Observation"}}))
            .collect();
        entries.push(json!({"resource": {"resourceType": "Observation", "status": "final"}, "request": {"method": "POST", "url": "Observation"}}));
        entries.push(json!({"request": {"method": "GET", "url": "Observation?patient=pb&_summary=count"}}));
        let r = c.post("", &json!({"resourceType": "Bundle", "type": "batch", "entry": entries})).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let e = r.body["entry"].as_array().unwrap();
        assert_eq!(e.len(), 102);
        assert!(e[..100].iter().all(|x| x["response"]["status"] == "201 Created" && x["response"]["location"].as_str().unwrap().starts_with("Observation/")));
        assert_eq!(e[100]["response"]["status"], "400");
        assert_eq!(e[100]["response"]["outcome"]["resourceType"], "OperationOutcome");
        assert_eq!(c.get("/Observation?patient=pb&_summary=count").await.body["total"], 100);
        assert_outcome(&c.post("", &json!({"resourceType": "Bundle", "type": "collection"})).await, 400, "batch and transaction");
    });
}

/// Pages stay correct while new readings keep arriving: every resource that existed when paging
/// began is seen exactly once (new ones sort after them by _lastUpdated).
fn paging_stays_correct_under_concurrent_writes(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let c = Client::new(&s);
        let mut original = std::collections::HashSet::new();
        for i in 0..30 {
            let r = c.post("/Observation", &glucose("pg", "2026-11-28T06:00:00Z", 90.0, &format!("pg-{i}"))).await;
            original.insert(r.body["id"].as_str().unwrap().to_owned());
        }
        let mut seen = Vec::new();
        let mut url = "/Observation?patient=pg&_count=7".to_owned();
        let mut written = 0;
        loop {
            let page = c.get(&url).await;
            assert_eq!(page.status, 200, "{}", page.body);
            for e in page.body["entry"].as_array().unwrap() {
                seen.push(e["resource"]["id"].as_str().unwrap().to_owned());
            }
            // A device uploads more readings between page fetches.
            for _ in 0..3 {
                written += 1;
                c.post("/Observation", &glucose("pg", "2026-11-28T06:30:00Z", 95.0, &format!("pg-new-{written}")))
                    .await;
            }
            let next = page.body["link"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["relation"] == "next")
                .map(|l| l["url"].as_str().unwrap().to_owned());
            match next {
                Some(n) if seen.len() < 200 => url = n.split("/fhir").nth(1).unwrap().to_owned(),
                _ => break,
            }
        }
        let unique: std::collections::HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "no resource twice");
        assert!(original.is_subset(&unique), "every original resource seen");
    });
}

/// Reads, searches and history are audited: each leaves a durable `fhir.access.*` event naming what
/// was disclosed (or the refusal), before its response.
fn reads_and_searches_leave_access_events(backend: Backend) {
    let d = Deployment::new(backend);
    let s = d.start(&["--insecure-no-auth"]);
    let id = rt().block_on(async {
        let c = Client::new(&s);
        let created = c.post("/Observation", &glucose("pa", "2026-11-28T07:00:00Z", 101.0, "a-1")).await;
        let id = created.body["id"].as_str().unwrap().to_owned();
        assert_eq!(
            c.send(
                reqwest::Method::GET,
                &format!("/Observation/{id}"),
                None,
                &[("user-agent", "audit-test/1"), ("x-request-id", "req-audit-1")]
            )
            .await
            .status,
            200
        );
        assert_eq!(c.get("/Observation/missing-one").await.status, 404);
        assert_eq!(c.get("/Observation?patient=pa").await.body["total"], 1);
        assert_eq!(c.get("/Observation?colour=red").await.status, 400);
        assert_eq!(c.get(&format!("/Observation/{id}/_history")).await.status, 200);
        id
    });
    assert!(s.terminate().0.success());
    let access = events(&d, "cairn.access");
    assert_eq!(access.len(), 5, "{access:#?}");
    let read = access
        .iter()
        .find(|e| e["payload"]["interaction"] == "read" && e["payload"]["status"] == 200)
        .expect("the read");
    assert_eq!(read["type"], "fhir.access.read");
    assert_eq!(
        read["payload"]["returned"][0],
        json!({"resource_type": "Observation", "id": id, "version_id": 1, "patient": "Patient/pa"})
    );
    assert_eq!(read["patient"], "Patient/pa");
    assert_eq!(read["request_id"], "req-audit-1");
    assert_eq!(read["actor"]["user_agent"], "audit-test/1");
    assert_eq!(read["actor"]["source_address"], "127.0.0.1");
    assert!(access.iter().any(|e| e["payload"]["status"] == 404 && e["payload"]["id"] == "missing-one"));
    let search =
        access.iter().find(|e| e["type"] == "fhir.access.search" && e["payload"]["status"] == 200).expect("the search");
    assert_eq!(search["payload"]["query"], "patient=pa");
    assert_eq!(search["payload"]["returned"][0]["id"], id);
    assert_eq!(search["patient"], "Patient/pa");
    assert!(access.iter().any(|e| e["type"] == "fhir.access.search" && e["payload"]["status"] == 400));
    assert!(access.iter().any(|e| e["payload"]["interaction"] == "history-instance"));
}

fn patients_and_devices_are_searchable(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let c = Client::new(&s);
        let patients = [
            json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "A-1"}], "name": [{"family": "Müller", "given": ["Anna", "Lena"]}], "gender": "female", "birthDate": "1980-05-17"}),
            json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "B-2"}], "name": [{"family": "Moller", "given": ["Bo"]}], "gender": "male", "birthDate": "1975"}),
        ];
        let mut ids = Vec::new();
        for p in &patients {
            let r = c.post("/Patient", p).await;
            assert_eq!(r.status, 201, "{}", r.body);
            ids.push(r.body["id"].as_str().unwrap().to_owned());
        }
        let total = |path: String| {
            let c = &c;
            async move {
                let r = c.get(&path).await;
                assert_eq!(r.status, 200, "{path}: {}", r.body);
                r.body["total"].as_u64().unwrap()
            }
        };
        assert_eq!(total("/Patient?name=mul".into()).await, 1, "accent- and case-insensitive prefix");
        assert_eq!(total("/Patient?family=M".into()).await, 2);
        assert_eq!(total("/Patient?family:exact=Moller".into()).await, 1);
        assert_eq!(total("/Patient?given=lena".into()).await, 1);
        assert_eq!(total("/Patient?identifier=urn:mrn|B-2".into()).await, 1);
        assert_eq!(total("/Patient?gender=female".into()).await, 1);
        assert_eq!(total("/Patient?birthdate=lt1978".into()).await, 1);
        assert_eq!(total("/Patient?birthdate=1980-05".into()).await, 1);
        assert_eq!(total(format!("/Patient?_id={}", ids[1])).await, 1);

        let device = json!({
            "resourceType": "Device", "status": "active",
            "identifier": [{"system": "urn:serial", "value": "GM-77"}],
            "type": {"coding": [{"system": "http://snomed.info/sct", "code": "337414009", "display": "Blood glucose meter"}]},
            "patient": {"reference": format!("Patient/{}", ids[0])}
        });
        assert_eq!(c.post("/Device", &device).await.status, 201);
        assert_eq!(total("/Device?type=http://snomed.info/sct|337414009".into()).await, 1);
        assert_eq!(total(format!("/Device?patient={}", ids[0])).await, 1);
        assert_eq!(total("/Device?identifier=GM-77&status=active".into()).await, 1);
        assert_eq!(total("/Device?status:not=active".into()).await, 0);
        assert_outcome(&c.get("/Device?name=x").await, 400, "name");
    });
}

/// Every event a realistic run writes (not just the examples) validates against its JSON Schema.
fn every_event_written_by_a_run_matches_its_schema(backend: Backend) {
    let d = Deployment::new(backend);
    let s = d.start(&["--insecure-no-auth"]);
    rt().block_on(async {
        let c = Client::new(&s);
        let r = c.post("/Observation", &glucose("ps", "2026-11-28T07:00:00Z", 101.0, "sc-1")).await;
        let id = r.body["id"].as_str().unwrap().to_owned();
        let mut v = r.body.clone();
        v["status"] = json!("amended");
        c.put(&format!("/Observation/{id}"), &v, &[]).await;
        c.get(&format!("/Observation/{id}")).await;
        c.get(&format!("/Observation/{id}/_history/1")).await;
        c.get("/Observation/nope").await;
        c.get("/Observation?patient=ps&date=ge2026-11-01").await;
        c.get("/Observation?bogus=1").await;
        c.get("/_history").await;
        c.get("/Observation/_history").await;
        c.get(&format!("/Observation/{id}/_history")).await;
        c.send(reqwest::Method::DELETE, &format!("/Observation/{id}"), None, &[]).await;
        c.post("", &json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:00000000-0000-4000-8000-0000000000aa", "resource": {"resourceType": "Patient", "name": [{"family": "S"}]}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Device", "status": "active", "patient": {"reference": "urn:uuid:00000000-0000-4000-8000-0000000000aa"}}, "request": {"method": "POST", "url": "Device"}}
        ]})).await;
    });
    assert!(s.terminate().0.success());
    let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/events");
    let load =
        |name: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(schemas.join(name)).unwrap()).unwrap() };
    let envelope = load("envelope.schema.json");
    let registry = jsonschema::Registry::new()
        .add(envelope["$id"].as_str().unwrap(), envelope.clone())
        .unwrap()
        .prepare()
        .unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for topic in ["cairn.fhir", "cairn.access", "cairn.auth"] {
        for event in events(&d, topic) {
            let t = event["type"].as_str().unwrap().to_owned();
            let validator = jsonschema::options()
                .should_validate_formats(true)
                .with_registry(&registry)
                .build(&load(&format!("{t}.schema.json")))
                .unwrap();
            let errors: Vec<String> =
                validator.iter_errors(&event).map(|e| format!("{e} at {}", e.instance_path())).collect();
            assert!(errors.is_empty(), "{t}: {errors:?}\n{event:#}");
            seen.insert(t);
        }
    }
    for t in [
        "fhir.resource.created",
        "fhir.resource.updated",
        "fhir.resource.deleted",
        "fhir.access.read",
        "fhir.access.search",
    ] {
        assert!(seen.contains(t), "the run produced no {t}");
    }
}

/// Decimals come back exactly as written (FHIR decimals carry their precision): `5.10` stays `5.10`.
fn decimals_round_trip_as_written(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let c = Client::new(&s);
        let body = br#"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"15074-8"}]},"subject":{"reference":"Patient/pd"},"valueQuantity":{"value":5.10,"unit":"mmol/L","system":"http://unitsofmeasure.org","code":"mmol/L"}}"#;
        let created = c.send(reqwest::Method::POST, "/Observation", Some(body.to_vec()), &[]).await;
        assert_eq!(created.status, 201, "{}", created.body);
        let id = created.body["id"].as_str().unwrap();
        let raw = c.http.get(format!("{}/Observation/{id}", c.base)).send().await.unwrap().text().await.unwrap();
        assert!(raw.contains("\"value\":5.10"), "{raw}");
        assert_eq!(c.get("/Observation?value-quantity=5.1|http://unitsofmeasure.org|mmol/L").await.body["total"], 1);
    });
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// A small tmpfs, so the disk can really fill up. Needs root (as on our CI and dev machines).
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap().keep();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "this test mounts a tmpfs to fill a disk; it needs root");
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// When the log cannot take an event (here: the disk is full), the API fails closed: writes answer
/// 503 and store nothing half-way, reads answer 503 and disclose nothing (their audit event cannot be
/// written), readiness says why, and every write acknowledged before is in the log.
#[test]
fn a_full_disk_fails_closed() {
    let disk = Tmpfs::mount("24m");
    let data = disk.0.join("data");
    let s = Server::start(&data, &["--insecure-no-auth", "--read-wait-ms", "1000"]);
    let acked = rt().block_on(async {
        let c = Client::new(&s);
        let mut acked = Vec::new();
        let mut first_failure = None;
        for i in 0..2000 {
            let mut reading = glucose("pf", "2026-11-28T07:00:00Z", 100.0, &format!("f-{i}"));
            reading["note"] = json!([{"text": "x".repeat(60_000)}]);
            let r = c.post("/Observation", &reading).await;
            match r.status {
                201 => acked.push(r.body["id"].as_str().unwrap().to_owned()),
                _ => {
                    first_failure = Some(r);
                    break;
                }
            }
        }
        let failure = first_failure.expect("the disk filled up");
        assert_outcome(&failure, 503, "nothing was stored");
        assert!(!acked.is_empty());
        // Everything after fails closed too.
        assert_outcome(&c.post("/Observation", &glucose("pf", "2026-11-28", 1.0, "after")).await, 503, "");
        let read = c.get(&format!("/Observation/{}", acked[0])).await;
        assert_eq!(read.status, 503, "a read whose audit event cannot be written discloses nothing: {}", read.body);
        assert!(read.body.get("status").is_none(), "no resource in the body");
        let ready = reqwest::get(format!("{}/readyz", s.base_url)).await.unwrap();
        assert_eq!(ready.status().as_u16(), 503);
        acked
    });
    drop(s);
    // Every acknowledged write is in the log (read back from the full disk, read-only).
    let written: std::collections::HashSet<String> =
        events_in(&data, "cairn.fhir").into_iter().map(|e| e["payload"]["id"].as_str().unwrap().to_owned()).collect();
    for id in &acked {
        assert!(written.contains(id), "acknowledged {id} missing from the log");
    }
}

/// Each Observation search parameter, and each date prefix against dateTime (second and day
/// precision), Period and instant values, over HTTP: which resources each query finds.
fn every_observation_search_parameter_and_date_prefix(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let c = Client::new(&s);
        let mut a = glucose("px", "2026-11-10T10:00:00Z", 95.0, "px-a");
        a["device"] = json!({"reference": "Device/meter-x"});
        let mut b = glucose("px", "2026-11-12", 110.0, "px-b");
        b["category"][0]["coding"][0]["code"] = json!("vital-signs");
        let mut cc = glucose("px", "2026-11-14T00:00:00Z", 130.0, "px-c");
        cc.as_object_mut().unwrap().remove("effectiveDateTime");
        cc["effectivePeriod"] = json!({"start": "2026-11-14T00:00:00Z", "end": "2026-11-16T00:00:00Z"});
        cc["status"] = json!("preliminary");
        let mut dd = glucose("px", "2026-11-20T08:30:00Z", 150.0, "px-d");
        dd.as_object_mut().unwrap().remove("effectiveDateTime");
        dd["effectiveInstant"] = json!("2026-11-20T08:30:00.000Z");
        let mut ids = std::collections::BTreeMap::new();
        for (name, r) in [("a", &a), ("b", &b), ("c", &cc), ("d", &dd)] {
            let created = c.post("/Observation", r).await;
            assert_eq!(created.status, 201, "{}", created.body);
            ids.insert(created.body["id"].as_str().unwrap().to_owned(), name);
        }
        let id_of = |name: &str| ids.iter().find(|(_, n)| **n == name).unwrap().0.clone();
        let found = |q: String| {
            let c = &c;
            let ids = &ids;
            async move {
                let r = c.get(&format!("/Observation?patient=px&{q}&_count=100")).await;
                assert_eq!(r.status, 200, "{q}: {}", r.body);
                let mut names: Vec<&str> = r.body["entry"]
                    .as_array()
                    .map(|e| e.iter().map(|e| ids[e["resource"]["id"].as_str().unwrap()]).collect())
                    .unwrap_or_default();
                names.sort_unstable();
                names.join(",")
            }
        };
        let cases: &[(&str, &str)] = &[
            ("date=2026-11-10", "a"),
            ("date=eq2026-11-12", "b"),
            ("date=ne2026-11-10", "b,c,d"),
            ("date=lt2026-11-12", "a"),
            ("date=le2026-11-12", "a,b"),
            ("date=gt2026-11-14", "c,d"),
            ("date=ge2026-11-14", "c,d"),
            ("date=sa2026-11-12", "c,d"),
            ("date=eb2026-11-14", "a,b"),
            // eq: the day must contain the whole Period (14th to 16th): it does not.
            ("date=2026-11-15", ""),
            ("date=ge2026-11-14T12:00:00Z&date=le2026-11-15", "c"),
            ("date=2026-11-20T08:30:00Z", "d"),
            ("date=2026-11", "a,b,c,d"),
            ("date=lt2026-11-01,gt2026-11-19", "d"),
            ("device=Device/meter-x", "a"),
            ("device=meter-1", "b,c,d"),
            ("status=preliminary", "c"),
            ("status=final,preliminary", "a,b,c,d"),
            ("category=vital-signs", "b"),
            ("category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory", "a,c,d"),
            ("code=2339-0", "a,b,c,d"),
            ("identifier=urn:example:meter-1|px-c", "c"),
            ("value-quantity=ge130", "c,d"),
            ("value-quantity=lt100|http://unitsofmeasure.org|mg/dL", "a"),
            ("value-quantity=110", "b"),
            ("_lastUpdated=gt2020-01-01", "a,b,c,d"),
            ("_lastUpdated=lt2020-01-01", ""),
            ("subject=Patient/px&value-quantity=gt100&date=lt2026-11-15", "b,c"),
        ];
        for (q, expected) in cases {
            assert_eq!(found((*q).to_owned()).await, *expected, "{q}");
        }
        assert_eq!(found(format!("_id={}", id_of("b"))).await, "b");
        assert_eq!(found(format!("_id={},{}", id_of("a"), id_of("d"))).await, "a,d");
        // `ap` is about 10% of the distance to now: the reading on the day is found, one 10 days off is not.
        let ap = found("date=ap2026-11-20".to_owned()).await;
        assert!(ap.contains('d') && !ap.contains('a'), "date=ap2026-11-20 found {ap}");
    });
}

/// `_history?_at=T` at instance, type and system level: the versions that were current at T, not
/// every version changed before it.
fn history_at_shows_what_was_current(backend: Backend) {
    let (_d, s) = server(backend);
    rt().block_on(async {
        let c = Client::new(&s);
        let pause = || tokio::time::sleep(std::time::Duration::from_millis(15));
        let a1 = c.post("/Patient", &json!({"resourceType": "Patient", "name": [{"family": "A1"}]})).await;
        let a = a1.body["id"].as_str().unwrap().to_owned();
        pause().await;
        let a2 = c
            .put(
                &format!("/Patient/{a}"),
                &json!({"resourceType": "Patient", "id": a, "name": [{"family": "A2"}]}),
                &[],
            )
            .await;
        pause().await;
        let b1 = c.post("/Patient", &json!({"resourceType": "Patient", "name": [{"family": "B1"}]})).await;
        let b = b1.body["id"].as_str().unwrap().to_owned();
        pause().await;
        let b2 = c
            .put(
                &format!("/Patient/{b}"),
                &json!({"resourceType": "Patient", "id": b, "name": [{"family": "B2"}]}),
                &[],
            )
            .await;
        let when = |r: &Reply| r.body["meta"]["lastUpdated"].as_str().unwrap().replace('+', "%2B");
        let families = |r: Reply| -> Vec<String> {
            assert_eq!(r.status, 200, "{}", r.body);
            r.body["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["resource"]["name"][0]["family"].as_str().unwrap().to_owned())
                .collect()
        };
        // At the moment a2 was written: a2 only (b did not exist, a1 was just replaced).
        assert_eq!(families(c.get(&format!("/Patient/_history?_at={}", when(&a2))).await), ["A2"]);
        // When b1 was written: a2 was still current, and b1.
        assert_eq!(families(c.get(&format!("/Patient/_history?_at={}", when(&b1))).await), ["B1", "A2"]);
        assert_eq!(families(c.get(&format!("/_history?_at={}", when(&b2))).await), ["B2", "A2"]);
        assert_eq!(families(c.get(&format!("/Patient/{a}/_history?_at={}", when(&b2))).await), ["A2"]);
        assert_eq!(families(c.get(&format!("/Patient/{a}/_history?_at={}", when(&a1))).await), ["A1"]);
        // Without _at, type history lists every version.
        assert_eq!(families(c.get("/Patient/_history").await).len(), 4);

        // Search as of a moment (`_asOf`): each resource as it was then, matched as it was then.
        pause().await;
        let deleted = c.send(reqwest::Method::DELETE, &format!("/Patient/{b}"), None, &[]).await;
        assert_eq!(deleted.status, 204);
        let sorted = |r: Reply| {
            let mut f = families(r);
            f.sort();
            f
        };
        assert_eq!(sorted(c.get(&format!("/Patient?_asOf={}", when(&a1))).await), ["A1"]);
        assert_eq!(sorted(c.get(&format!("/Patient?_asOf={}", when(&b1))).await), ["A2", "B1"]);
        assert_eq!(sorted(c.get(&format!("/Patient?_asOf={}&name=B1", when(&b1))).await), ["B1"]);
        assert_eq!(sorted(c.get(&format!("/Patient?_asOf={}&name=B1", when(&b2))).await), Vec::<String>::new());
        assert_eq!(
            sorted(c.get(&format!("/Patient?_asOf={}", when(&b2))).await),
            ["A2", "B2"],
            "b before its deletion"
        );
        assert_eq!(sorted(c.get("/Patient").await), ["A2"], "and without _asOf, today");
        pause().await;
        let after_deletion = cairn_events::Timestamp::now().to_rfc3339();
        assert_eq!(sorted(c.get(&format!("/Patient?_asOf={after_deletion}")).await), ["A2"], "b deleted by then");
        let count = c.get(&format!("/Patient?_asOf={}&_summary=count", when(&b1))).await;
        assert_eq!(count.body["total"], 2, "{}", count.body);
        // Before anything was written: nothing. Imprecise moments are refused.
        assert_eq!(sorted(c.get("/Patient?_asOf=2000-01-01T00:00:00Z").await), Vec::<String>::new());
        assert_eq!(c.get("/Patient?_asOf=2026-11").await.status, 400);
    });
}
