//! The audit trail over HTTP, from a realistic run: a device gateway writes and reads two patients'
//! data (with some mistakes and one forged token), then an auditor reads the trail back through the
//! FHIR API. Every AuditEvent and Provenance must satisfy the R4 rules (checked here, independently
//! of the code that builds them), and the records must say who did what to whose data.

use cairn_tests::{Backend, Deployment, Server};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(server: &Server) -> Api {
        Api { http: reqwest::Client::new(), base: server.base_url.clone() }
    }

    async fn token(&self, id: &str, secret: &str, scope: &str) -> String {
        let body = format!("grant_type=client_credentials&scope={}", scope.replace(' ', "%20").replace('/', "%2F"));
        let resp = self
            .http
            .post(format!("{}/token", self.base))
            .basic_auth(id, Some(secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        let t: Value = resp.json().await.unwrap();
        t["access_token"].as_str().unwrap_or_else(|| panic!("no token: {t}")).to_owned()
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}/fhir{path}", self.base)).bearer_auth(token);
        if let Some(b) = body {
            req = req.header("content-type", "application/fhir+json").body(serde_json::to_vec(b).unwrap());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Every entry of a search, following `next` links.
    async fn search_all(&self, path: &str, token: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut url = format!("{}/fhir{path}", self.base);
        loop {
            let resp = self.http.get(&url).bearer_auth(token).send().await.unwrap();
            let status = resp.status().as_u16();
            let bundle: Value = resp.json().await.unwrap();
            assert_eq!(status, 200, "{url}: {bundle}");
            out.extend(bundle["entry"].as_array().into_iter().flatten().map(|e| e["resource"].clone()));
            match bundle["link"].as_array().into_iter().flatten().find(|l| l["relation"] == "next") {
                Some(next) => url = next["url"].as_str().unwrap().to_owned(),
                None => return out,
            }
        }
    }
}

fn observation(patient: &str, value: u32, identifier: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
        "subject": {"reference": patient},
        "identifier": [{"system": "urn:test:reading", "value": identifier}],
        "effectiveDateTime": "2026-11-28T08:30:00Z",
        "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}
    })
}

// ------------------------------------------------------------------ R4 rules, checked independently

fn is_instant(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok() && s.len() >= 20 && s.contains('T')
}

fn is_reference(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    let ty = |t: &str| t.starts_with(|c: char| c.is_ascii_uppercase()) && t.chars().all(|c| c.is_ascii_alphanumeric());
    let id =
        |i: &str| (1..=64).contains(&i.len()) && i.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    match parts.as_slice() {
        [t, i] => ty(t) && id(i),
        [t, i, "_history", v] => ty(t) && id(i) && v.parse::<u64>().is_ok_and(|v| v > 0),
        _ => false,
    }
}

fn check_reference(r: &Value, at: &str, problems: &mut Vec<String>) {
    let Some(o) = r.as_object() else { return problems.push(format!("{at}: not a Reference")) };
    if !(o.contains_key("reference") || o.contains_key("identifier") || o.contains_key("display")) {
        problems.push(format!("{at}: a Reference needs reference, identifier or display"));
    }
    if let Some(reference) = o.get("reference")
        && !reference.as_str().is_some_and(is_reference)
    {
        problems.push(format!("{at}.reference {reference} is not Type/id[/_history/n]"));
    }
}

fn check_coding(c: &Value, at: &str, problems: &mut Vec<String>) {
    if !(c["system"].is_string() && c["code"].is_string()) {
        problems.push(format!("{at}: a Coding needs system and code: {c}"));
    }
}

const RESTFUL: [&str; 17] = [
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history",
    "history-instance",
    "history-type",
    "history-system",
    "create",
    "search",
    "search-type",
    "search-system",
    "capabilities",
    "transaction",
    "batch",
    "operation",
];

/// The R4 AuditEvent rules and value sets (aud-1; required elements and their types).
fn audit_event_problems(a: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let id = a["id"].as_str().unwrap_or("?").to_owned();
    let at = |e: &str| format!("AuditEvent/{id}.{e}");
    let ty = &a["type"];
    check_coding(ty, &at("type"), &mut p);
    let type_code = (ty["system"].as_str().unwrap_or(""), ty["code"].as_str().unwrap_or(""));
    let allowed_subtypes: &[(&str, &str)] = match type_code {
        ("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest") => &[],
        ("http://dicom.nema.org/resources/ontology/DCM", "110114") => &[
            ("http://dicom.nema.org/resources/ontology/DCM", "110122"),
            ("http://dicom.nema.org/resources/ontology/DCM", "110123"),
            ("urn:ihe:event-type-code", "ITI-71"),
        ],
        ("http://dicom.nema.org/resources/ontology/DCM", "110113") => {
            &[("http://dicom.nema.org/resources/ontology/DCM", "110137")]
        }
        other => {
            p.push(format!("{}: type {other:?} is not one Cairn should produce", at("type")));
            &[]
        }
    };
    for (i, s) in a["subtype"].as_array().into_iter().flatten().enumerate() {
        check_coding(s, &at(&format!("subtype[{i}]")), &mut p);
        let code = (s["system"].as_str().unwrap_or(""), s["code"].as_str().unwrap_or(""));
        let ok = if type_code.1 == "rest" {
            code.0 == "http://hl7.org/fhir/restful-interaction" && RESTFUL.contains(&code.1)
        } else {
            allowed_subtypes.contains(&code)
        };
        if !ok {
            p.push(format!("{}: {code:?} outside the value set for type {type_code:?}", at("subtype")));
        }
    }
    if !a["action"].as_str().is_some_and(|x| ["C", "R", "U", "D", "E"].contains(&x)) {
        p.push(format!("{}: {}", at("action"), a["action"]));
    }
    if !a["recorded"].as_str().is_some_and(is_instant) {
        p.push(format!("{}: recorded must be an instant: {}", at("recorded"), a["recorded"]));
    }
    if !a["outcome"].as_str().is_some_and(|x| ["0", "4", "8", "12"].contains(&x)) {
        p.push(format!("{}: {}", at("outcome"), a["outcome"]));
    }
    let agents = a["agent"].as_array().cloned().unwrap_or_default();
    if agents.is_empty() {
        p.push(format!("{}: at least one agent", at("agent")));
    }
    for (i, ag) in agents.iter().enumerate() {
        let here = at(&format!("agent[{i}]"));
        if !ag["requestor"].is_boolean() {
            p.push(format!("{here}.requestor is required"));
        }
        if let Some(who) = ag.get("who") {
            check_reference(who, &format!("{here}.who"), &mut p);
        }
        for c in ag["type"]["coding"].as_array().into_iter().flatten() {
            check_coding(c, &format!("{here}.type"), &mut p);
        }
        if let Some(n) = ag.get("network")
            && !n["type"].as_str().is_some_and(|t| ["1", "2", "3", "4", "5"].contains(&t))
        {
            p.push(format!("{here}.network.type {}", n["type"]));
        }
        for policy in ag["policy"].as_array().into_iter().flatten() {
            if !policy.as_str().is_some_and(|u| u.contains(':')) {
                p.push(format!("{here}.policy must be a uri: {policy}"));
            }
        }
    }
    if agents.iter().filter(|a| a["requestor"] == true).count() != 1 {
        p.push(format!("{}: exactly one requestor expected", at("agent")));
    }
    match a["source"].get("observer") {
        Some(o) => check_reference(o, &at("source.observer"), &mut p),
        None => p.push(format!("{}: required", at("source.observer"))),
    }
    for (i, e) in a["entity"].as_array().into_iter().flatten().enumerate() {
        let here = at(&format!("entity[{i}]"));
        if e.get("query").is_some() && e.get("name").is_some() {
            p.push(format!("{here}: sev-1, name and query both present"));
        }
        if let Some(q) = e.get("query") {
            use base64::Engine;
            if q.as_str().is_none_or(|q| base64::engine::general_purpose::STANDARD.decode(q).is_err()) {
                p.push(format!("{here}.query is not base64Binary"));
            }
        }
        if let Some(w) = e.get("what") {
            check_reference(w, &format!("{here}.what"), &mut p);
        }
        for k in ["type", "role"] {
            if let Some(c) = e.get(k) {
                check_coding(c, &format!("{here}.{k}"), &mut p);
            }
        }
    }
    p
}

/// The R4 Provenance rules: target (version-specific here), recorded, agents with who, activity,
/// entities with role and what.
fn provenance_problems(v: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let id = v["id"].as_str().unwrap_or("?").to_owned();
    let at = |e: &str| format!("Provenance/{id}.{e}");
    let targets = v["target"].as_array().cloned().unwrap_or_default();
    if targets.is_empty() {
        p.push(format!("{}: at least one target", at("target")));
    }
    for t in &targets {
        check_reference(t, &at("target"), &mut p);
        if !t["reference"].as_str().is_some_and(|r| r.contains("/_history/")) {
            p.push(format!("{}: not version-specific: {t}", at("target")));
        }
    }
    if !v["recorded"].as_str().is_some_and(is_instant) {
        p.push(format!("{}: {}", at("recorded"), v["recorded"]));
    }
    let agents = v["agent"].as_array().cloned().unwrap_or_default();
    if agents.is_empty() {
        p.push(format!("{}: at least one agent", at("agent")));
    }
    for (i, ag) in agents.iter().enumerate() {
        match ag.get("who") {
            Some(w) => check_reference(w, &at(&format!("agent[{i}].who")), &mut p),
            None => p.push(format!("{}: who is required", at(&format!("agent[{i}]")))),
        }
    }
    let activity = &v["activity"]["coding"][0];
    if activity["system"] != "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
        || !activity["code"].as_str().is_some_and(|c| ["CREATE", "UPDATE", "DELETE"].contains(&c))
    {
        p.push(format!("{}: {}", at("activity"), v["activity"]));
    }
    for e in v["entity"].as_array().into_iter().flatten() {
        if !e["role"]
            .as_str()
            .is_some_and(|r| ["derivation", "revision", "quotation", "source", "removal"].contains(&r))
        {
            p.push(format!("{}: role {}", at("entity"), e["role"]));
        }
        check_reference(&e["what"], &at("entity.what"), &mut p);
    }
    p
}

fn entity_refs(a: &Value) -> BTreeSet<String> {
    a["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["what"]["reference"].as_str().map(str::to_owned))
        .collect()
}

fn transaction_id(a: &Value) -> Option<String> {
    a["entity"]
        .as_array()?
        .iter()
        .find(|e| e["type"]["code"] == "XrequestId")
        .and_then(|e| e["what"]["identifier"]["value"].as_str().map(str::to_owned))
}

fn the_audit_trail_of_a_realistic_run(backend: Backend) {
    let d = Deployment::new(backend);
    let server = d.start(&[]);
    let gateway = d.register_client("Gateway", "system/Observation.cruds system/Patient.cru");
    let auditor = d.register_client("Compliance", "system/AuditEvent.rs system/Provenance.rs");
    let api = Api::new(&server);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        use reqwest::Method;
        let gw = api.token(&gateway.0, &gateway.1, "system/Observation.cruds system/Patient.cru").await;
        let jti =
            jsonwebtoken::dangerous::insecure_decode::<Value>(&gw).unwrap().claims["jti"].as_str().unwrap().to_owned();
        let mut observations: BTreeMap<String, String> = BTreeMap::new(); // id -> patient
        for p in ["p1", "p2"] {
            let (s, _) = api
                .call(
                    Method::PUT,
                    &format!("/Patient/{p}"),
                    &gw,
                    Some(&json!({"resourceType": "Patient", "id": p})),
                    &[],
                )
                .await;
            assert!(s == 201 || s == 200, "{s}");
            for i in 0..3 {
                let (s, o) = api
                    .call(
                        Method::POST,
                        "/Observation",
                        &gw,
                        Some(&observation(&format!("Patient/{p}"), 90 + i, &format!("{p}-{i}"))),
                        &[],
                    )
                    .await;
                assert_eq!(s, 201, "{o}");
                observations.insert(o["id"].as_str().unwrap().to_owned(), format!("Patient/{p}"));
            }
        }
        let (first, _) = observations.iter().next().map(|(a, b)| (a.clone(), b.clone())).unwrap();
        // An update, a read, a delete, and two searches (one patient; both patients, with a request id).
        let mut changed = observation("Patient/p1", 150, "p1-0");
        changed["id"] = json!(first);
        assert_eq!(api.call(Method::PUT, &format!("/Observation/{first}"), &gw, Some(&changed), &[]).await.0, 200);
        assert_eq!(api.call(Method::GET, &format!("/Observation/{first}"), &gw, None, &[]).await.0, 200);
        let last = observations.keys().last().unwrap().clone();
        assert_eq!(api.call(Method::DELETE, &format!("/Observation/{last}"), &gw, None, &[]).await.0, 204);
        assert_eq!(api.call(Method::GET, "/Observation?patient=Patient/p1", &gw, None, &[]).await.0, 200);
        let (s, both) = api
            .call(
                Method::GET,
                "/Observation?code=http://loinc.org|2339-0",
                &gw,
                None,
                &[("x-request-id", "search-both-patients")],
            )
            .await;
        assert_eq!(s, 200, "{both}");
        // Mistakes, each refused and each to be found in the trail.
        let (s, _) = api
            .call(
                Method::PUT,
                &format!("/Observation/{first}"),
                &gw,
                Some(&changed),
                &[("if-match", "W/\"1\""), ("x-request-id", "stale-if-match")],
            )
            .await;
        assert_eq!(s, 412);
        let (s, _) = api
            .call(
                Method::POST,
                "/Observation",
                &gw,
                Some(&json!({"resourceType": "Observation"})),
                &[("x-request-id", "invalid-body")],
            )
            .await;
        assert_eq!(s, 400);
        let (s, _) =
            api.call(Method::GET, "/Observation", "not-a-token", None, &[("x-request-id", "forged-token")]).await;
        assert_eq!(s, 401);
        let (s, _) = api.call(Method::GET, "/AuditEvent", &gw, None, &[("x-request-id", "gateway-snoops")]).await;
        assert_eq!(s, 403, "the gateway's wildcard-free scopes do not reach the audit trail");
        // The gateway says which meter took the readings (X-Provenance), on a single create and on a
        // batch: every resource written gets it, not only the first entry.
        let meter = json!({"resourceType": "Provenance",
            "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}]},
                       "who": {"reference": "Device/meter-7"}}],
            "entity": [{"role": "source", "what": {"identifier": {"system": "urn:test:upload", "value": "u-1"}}}]});
        let meter_header = meter.to_string();
        let (s, single) = api
            .call(Method::POST, "/Observation", &gw, Some(&observation("Patient/p2", 111, "p2-x")), &[("x-provenance", &meter_header)])
            .await;
        assert_eq!(s, 201, "{single}");
        let mut from_meter = vec![single["id"].as_str().unwrap().to_owned()];
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": observation("Patient/p2", 112, "p2-y"), "request": {"method": "POST", "url": "Observation"}},
            {"resource": observation("Patient/p2", 113, "p2-z"), "request": {"method": "POST", "url": "Observation"}}]});
        let (s, answer) = api.call(Method::POST, "", &gw, Some(&batch), &[("x-provenance", &meter_header)]).await;
        assert_eq!(s, 200, "{answer}");
        for e in answer["entry"].as_array().unwrap() {
            let location = e["response"]["location"].as_str().unwrap();
            from_meter.push(location.split('/').nth_back(2).unwrap().to_owned());
        }
        let mut bad = meter.clone();
        bad["target"] = json!([{"reference": "Observation/x"}]);
        let (s, refusal) = api
            .call(Method::POST, "/Observation", &gw, Some(&observation("Patient/p2", 114, "p2-w")), &[("x-provenance", &bad.to_string()), ("x-request-id", "bad-provenance")])
            .await;
        assert_eq!(s, 400, "{refusal}");
        assert!(refusal.to_string().contains("target"), "{refusal}");
        let au = api.token(&auditor.0, &auditor.1, "system/AuditEvent.rs system/Provenance.rs").await;
        let (s, _) = api
            .call(
                Method::POST,
                "/AuditEvent",
                &au,
                Some(&json!({"resourceType": "AuditEvent"})),
                &[("x-request-id", "write-audit")],
            )
            .await;
        assert_eq!(s, 405, "the trail is read-only");

        // The auditor reads the whole trail back.
        let all = api.search_all("/AuditEvent?_count=200", &au).await;
        let problems: Vec<String> = all.iter().flat_map(audit_event_problems).collect();
        assert!(problems.is_empty(), "{} AuditEvents, problems:\n{}", all.len(), problems.join("\n"));
        let provenances = api.search_all("/Provenance?_count=200", &au).await;
        let problems: Vec<String> = provenances.iter().flat_map(provenance_problems).collect();
        assert!(problems.is_empty(), "{} Provenances, problems:\n{}", provenances.len(), problems.join("\n"));
        // 2 Patients + 6 Observations + 1 update + 1 delete + 3 readings from the meter.
        assert_eq!(provenances.len(), 13, "one Provenance per write");
        for id in &from_meter {
            let p = provenances
                .iter()
                .find(|p| p["target"][0]["reference"].as_str().unwrap().starts_with(&format!("Observation/{id}/")))
                .unwrap_or_else(|| panic!("no Provenance for {id}"));
            assert_eq!(p["agent"][0]["who"]["identifier"]["value"], gateway.0.as_str(), "the token's agent comes first: {p}");
            assert!(p["agent"].as_array().unwrap().iter().any(|a| a["who"]["reference"] == "Device/meter-7"), "{p}");
            assert_eq!(p["entity"][0]["role"], "source", "{p}");
        }
        eprintln!("audit trail of the run: {} AuditEvents, {} Provenances, all valid", all.len(), provenances.len());

        // Every write, read and search is there, by the gateway's token.
        let by_token: Vec<&Value> = all
            .iter()
            .filter(|a| a["outcome"] == "0")
            .filter(|a| {
                a["agent"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|ag| ag["policy"][0] == format!("urn:ietf:params:oauth:jti:{jti}"))
            })
            .collect();
        let subtypes: BTreeMap<String, usize> = by_token.iter().fold(BTreeMap::new(), |mut m, a| {
            *m.entry(a["subtype"][0]["code"].as_str().unwrap().to_owned()).or_default() += 1;
            m
        });
        // 2 Patients (created by PUT), 6 Observations and 3 from the meter; one update.
        assert_eq!(subtypes.get("create"), Some(&11), "{subtypes:?}");
        assert_eq!(subtypes.get("update"), Some(&1), "{subtypes:?}");
        assert!(subtypes.get("search-type").is_some_and(|n| *n >= 3), "{subtypes:?}");
        assert_eq!(subtypes.get("delete"), Some(&1), "{subtypes:?}");
        assert!(subtypes.get("read").is_some_and(|n| *n >= 1), "{subtypes:?}");
        // The search that returned both patients' data: one AuditEvent per patient, each with its
        // patient's versions only.
        let both: Vec<&Value> =
            all.iter().filter(|a| transaction_id(a).as_deref() == Some("search-both-patients")).collect();
        assert_eq!(both.len(), 2, "{both:?}");
        for a in &both {
            let refs = entity_refs(a);
            let patient = refs.iter().find(|r| r.starts_with("Patient/")).expect("a patient entity").clone();
            for r in refs.iter().filter(|r| r.starts_with("Observation/")) {
                let id = r.split('/').nth(1).unwrap();
                assert_eq!(observations[id], patient, "{r} filed under {patient}");
            }
            assert!(a["entity"].as_array().unwrap().iter().any(|e| e["role"]["code"] == "24"), "the query entity");
        }
        // Each refusal, with a failure outcome.
        for (request, subtype, status) in [
            ("stale-if-match", "update", "412"),
            ("invalid-body", "create", "400"),
            ("forged-token", "search-type", "401"),
            ("gateway-snoops", "search-type", "403"),
            ("write-audit", "create", "405"),
            ("bad-provenance", "create", "400"),
        ] {
            let found: Vec<&Value> = all.iter().filter(|a| transaction_id(a).as_deref() == Some(request)).collect();
            assert_eq!(found.len(), 1, "{request}: {found:?}");
            let a = found[0];
            assert_eq!(a["outcome"], "4", "{request}: {a}");
            assert_eq!(a["subtype"][0]["code"], subtype, "{request}: {a}");
            assert!(a["outcomeDesc"].as_str().unwrap_or_default().contains(status), "{request}: {a}");
        }
        // The token grants are there in the ITI-71 shape, and the forged token's caller address.
        let grants = api.search_all("/AuditEvent?subtype=urn:ihe:event-type-code|ITI-71&outcome=0", &au).await;
        assert!(grants.len() >= 2, "{grants:?}");

        // The compliance officer's question: who accessed p1's data today, newest first.
        let p1 = api.search_all("/AuditEvent?patient=Patient/p1&date=ge2026-01-01&_sort=-date&_count=5", &au).await;
        assert!(p1.len() >= 5, "{}", p1.len());
        assert!(p1.iter().all(|a| entity_refs(a).contains("Patient/p1")));
        let dates: Vec<&str> = p1.iter().map(|a| a["recorded"].as_str().unwrap()).collect();
        assert!(dates.windows(2).all(|w| w[0] >= w[1]), "newest first: {dates:?}");
        // Who changed this Observation, version by version.
        let changes = api.search_all(&format!("/Provenance?target=Observation/{first}"), &au).await;
        let activities: BTreeSet<&str> =
            changes.iter().map(|p| p["activity"]["coding"][0]["code"].as_str().unwrap()).collect();
        assert_eq!(activities, BTreeSet::from(["CREATE", "UPDATE"]));
        assert!(changes.iter().all(|p| p["agent"][0]["who"]["identifier"]["value"] == gateway.0.as_str()));
        // Reading the trail is itself in the trail.
        let (_, page) = api.call(Method::GET, "/AuditEvent?subtype=search-type&_count=1000", &au, None, &[]).await;
        assert!(
            page["entry"].as_array().unwrap().iter().any(|e| e["resource"]["entity"][0]["query"].as_str().is_some_and(
                |q| String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, q).unwrap())
                    .unwrap()
                    .starts_with("AuditEvent?")
            )),
            "the auditor's own searches are audited"
        );
        // Unknown search parameters on the trail are refused like anywhere else.
        assert_eq!(api.call(Method::GET, "/AuditEvent?bogus=1", &au, None, &[]).await.0, 400);

        // Compliance reports: the accounting of access to p1's data, as JSON and as CSV.
        let window = "from=2026-01-01&to=2100-01-01";
        let (s, report) = api
            .call(Method::GET, &format!("/AuditEvent/$report?kind=patient-access&patient=p1&{window}"), &au, None, &[])
            .await;
        assert_eq!(s, 200, "{report}");
        let columns: Vec<&str> = report["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        let rows = report["rows"].as_array().unwrap();
        assert!(rows.len() >= 5, "{report}");
        let col = |name: &str| columns.iter().position(|c| *c == name).unwrap();
        assert!(rows.iter().all(|r| r[col("patient")].as_str().unwrap().contains("Patient/p1")), "{report}");
        assert!(rows.iter().any(|r| r[col("client")] == gateway.0.as_str() && r[col("interaction")] == "read"));
        assert!(rows.iter().any(|r| r[col("interaction")] == "search-type"
            && r[col("resources")].as_str().unwrap().contains("Observation/")));
        let recorded: Vec<&str> = rows.iter().map(|r| r[col("recorded")].as_str().unwrap()).collect();
        assert!(recorded.windows(2).all(|w| w[0] <= w[1]), "oldest first");
        let csv = api
            .http
            .get(format!(
                "{}/fhir/AuditEvent/$report?kind=patient-access&patient=Patient/p1&{window}&_format=csv",
                api.base
            ))
            .bearer_auth(&au)
            .send()
            .await
            .unwrap();
        assert_eq!(csv.status(), 200);
        assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
        let csv = csv.text().await.unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], columns.join(","));
        // The JSON report disclosed p1's trail, so it is in the accounting now: one row more.
        assert_eq!(lines.len(), 1 + rows.len() + 1, "{csv}");
        assert!(lines.last().unwrap().contains(",operation,"), "{csv}");
        // Security alerts: the two client registrations.
        let (s, alerts) =
            api.call(Method::GET, &format!("/AuditEvent/$report?kind=security-alerts&{window}"), &au, None, &[]).await;
        assert_eq!(s, 200, "{alerts}");
        let about: Vec<String> =
            alerts["rows"].as_array().unwrap().iter().map(|r| r[3].as_str().unwrap().to_owned()).collect();
        assert!(about.contains(&format!("urn:cairn:oauth-client|{}", gateway.0)), "{alerts}");
        // Without the auditor's scope, or with a bad request: refused, and the refusal recorded.
        assert_eq!(
            api.call(Method::GET, &format!("/AuditEvent/$report?kind=security-alerts&{window}"), &gw, None, &[])
                .await
                .0,
            403
        );
        let (s, bad) = api
            .call(Method::GET, "/AuditEvent/$report?kind=gossip&from=2026-01-01&to=2027-01-01", &au, None, &[])
            .await;
        assert_eq!(s, 400, "{bad}");
        assert!(bad["issue"][0]["diagnostics"].as_str().unwrap().contains("patient-access"), "{bad}");
        // The reports are in the trail too.
        let runs = api.search_all("/AuditEvent?subtype=operation", &au).await;
        assert!(runs.len() >= 4, "{}", runs.len());

        // The same report from the command line, through the running server, recorded like the others.
        let (status, out, err) = d.cairn(&[
            "audit", "report", "--kind", "patient-access", "--patient", "p1", "--from", "2026-01-01", "--to",
            "2100-01-01", "--format", "csv",
        ]);
        assert!(status.success(), "{out}{err}");
        let cli_lines: Vec<&str> = out.lines().collect();
        assert_eq!(cli_lines[0], columns.join(","), "{out}");
        assert!(cli_lines.len() >= lines.len(), "every row of the API's CSV, and the disclosures since: {out}");
        assert!(cli_lines[1..].iter().all(|l| l.contains("Patient/p1")), "{out}");
        let runs_after = api.search_all("/AuditEvent?subtype=operation", &au).await;
        assert_eq!(runs_after.len(), runs.len() + 1, "the CLI report is in the trail");

        // Evidence for a regulator: p1's audit slice, exported from the log and checked offline against
        // the seal key in the JWKS. It holds every record the API shows about p1, unchanged.
        let p1_trail = api.search_all("/AuditEvent?patient=Patient/p1&_count=200", &au).await;
        // (Provenance's `patient` parameter finds Provenances whose target is the Patient itself: the
        // Observations' are picked by target here.)
        let p1_provenance: Vec<Value> = provenances
            .iter()
            .filter(|p| {
                let target = p["target"][0]["reference"].as_str().unwrap();
                target.starts_with("Patient/p1/")
                    || observations.iter().any(|(id, patient)| {
                        patient == "Patient/p1" && target.starts_with(&format!("Observation/{id}/"))
                    })
            })
            .cloned()
            .collect();
        assert!(p1_provenance.len() >= 4, "p1 and its 3 Observations: {p1_provenance:?}");
        let jwks = api.http.get(format!("{}/jwks", api.base)).send().await.unwrap().text().await.unwrap();
        let files = tempfile::tempdir().unwrap();
        let jwks_file = files.path().join("jwks.json");
        std::fs::write(&jwks_file, &jwks).unwrap();
        let slice_file = files.path().join("p1.json");
        let (status, out, err) = d.cairn(&[
            "audit", "export", "--patient", "p1", "--from", "2026-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z",
            "--out", slice_file.to_str().unwrap(),
        ]);
        assert!(status.success(), "{out}{err}");
        let slice: Value = serde_json::from_slice(&std::fs::read(&slice_file).unwrap()).unwrap();
        let records = slice["records"].as_array().unwrap();
        for r in p1_trail.iter().chain(&p1_provenance) {
            assert!(records.contains(r), "{}/{} is missing from the slice, or differs", r["resourceType"], r["id"]);
        }
        assert!(
            records.iter().filter(|r| r["resourceType"] == "AuditEvent").all(|a| entity_refs(a).contains("Patient/p1")),
            "only p1's records"
        );
        // The proof shows p1's events whole, and of the other records of their stretches only digests:
        // no write of p2's data is in it.
        let shown: Vec<Value> = slice["proof"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|span| span["records"].as_array().unwrap().iter().filter_map(|r| r["value"].as_str()))
            .map(|b64| serde_json::from_slice(&base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()).unwrap())
            .collect();
        assert!(!shown.is_empty());
        for event in &shown {
            assert!(event.to_string().contains("p1"), "an event not about p1 is shown whole: {event}");
            assert!(!(event["type"] == "fhir.resource.created" && event.to_string().contains("Patient/p2")), "{event}");
        }
        let verify = |file: &std::path::Path, keys: &[&str]| {
            let mut args = vec!["audit", "verify", "--export", file.to_str().unwrap()];
            args.extend_from_slice(keys);
            cairn_tests::run_cairn(&args)
        };
        let (status, out, err) = verify(&slice_file, &["--jwks", jwks_file.to_str().unwrap()]);
        assert!(status.success() && out.starts_with("ok: ") && !out.contains("warning"), "{out}{err}");
        let seal_kid = serde_json::from_str::<Value>(&jwks).unwrap()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kty"] == "OKP")
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .unwrap();
        assert!(out.contains(&format!("signed by key {seal_kid}")), "names the signer: {out}");
        // Without trusted keys a slice proves nothing: refused. A slice with a span repeated: refused.
        let (status, _, err) = verify(&slice_file, &[]);
        assert_eq!(status.code(), Some(1));
        assert!(err.contains("without them a slice proves nothing"), "{err}");
        let mut doubled = slice.clone();
        let span = doubled["proof"][0].clone();
        doubled["proof"].as_array_mut().unwrap().push(span);
        let doubled_file = files.path().join("doubled.json");
        std::fs::write(&doubled_file, doubled.to_string()).unwrap();
        let (status, out, _) = verify(&doubled_file, &["--jwks", jwks_file.to_str().unwrap()]);
        assert_eq!(status.code(), Some(2), "{out}");
        assert!(out.contains("two spans cover the same records"), "{out}");
        // Any change is found: an AuditEvent edited, an event's bytes edited, a stranger's key.
        let tampered_file = files.path().join("tampered.json");
        let mut edited = slice.clone();
        let i = edited["records"].as_array().unwrap().iter().position(|r| r["resourceType"] == "AuditEvent").unwrap();
        edited["records"][i]["outcome"] = json!("12");
        std::fs::write(&tampered_file, edited.to_string()).unwrap();
        let (status, out, _) = verify(&tampered_file, &["--jwks", jwks_file.to_str().unwrap()]);
        assert_eq!(status.code(), Some(2), "{out}");
        assert!(out.contains("BROKEN") && out.contains("altered"), "{out}");
        let mut edited = slice.clone();
        let value = edited["proof"][0]["records"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|r| r["value"].is_string())
            .unwrap();
        let mut bytes =
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, value["value"].as_str().unwrap()).unwrap();
        let at = bytes.iter().position(|b| b.is_ascii_digit()).unwrap();
        bytes[at] = if bytes[at] == b'9' { b'8' } else { bytes[at] + 1 };
        value["value"] = json!(base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &bytes));
        std::fs::write(&tampered_file, edited.to_string()).unwrap();
        let (status, out, _) = verify(&tampered_file, &["--jwks", jwks_file.to_str().unwrap()]);
        assert_eq!(status.code(), Some(2), "{out}");
        assert!(out.contains("does not reach the closing seal"), "{out}");
        let stranger = cairn_log::seal::SealSigner::generate().public_key_hex();
        let (status, out, _) = verify(&slice_file, &["--seal-public-key", &stranger]);
        assert_eq!(status.code(), Some(2), "{out}");
        assert!(out.contains("not signed by a trusted key"), "{out}");
        // Two reads of p1's data with request ids a client chose to be hostile: the timeline's page and
        // CSV must show them as text.
        let p1_obs = observations.iter().find(|(id, p)| *p == "Patient/p1" && **id != last).unwrap().0.clone();
        for id in ["<script>alert(1)</script>", "=HYPERLINK(\"http://x\")"] {
            let (s, _) = api.call(Method::GET, &format!("/Observation/{p1_obs}"), &gw, None, &[("x-request-id", id)]).await;
            assert_eq!(s, 200);
        }
        // The investigator's timeline of p1, from the log: every access, oldest first, the gateway's
        // token grant before its first use, writes with the version they wrote.
        let window = ["--patient", "p1", "--from", "2026-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"];
        let timeline = |format: &str| {
            let mut args = vec!["investigate", "timeline", "--format", format];
            args.extend_from_slice(&window);
            let (status, out, err) = d.cairn(&args);
            assert!(status.success(), "{out}{err}");
            out
        };
        let entries: Vec<Value> = timeline("jsonl").lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let first_use = entries.iter().position(|e| e["kind"] == "access" && e["jti"] == jti.as_str());
        let grant = entries.iter().position(|e| e["kind"] == "token" && e["jti"] == jti.as_str());
        assert!(grant.is_some() && first_use.is_some() && grant < first_use, "{entries:#?}");
        let accesses = entries.iter().filter(|e| e["kind"] == "access").count();
        assert!(accesses >= p1_trail.len(), "every AuditEvent about p1 is on the timeline: {accesses}");
        assert!(entries.iter().any(|e| e["interaction"] == "create"
            && e["version_after"].as_str().is_some_and(|v| v.starts_with("Patient/p1/_history/"))));
        let recorded: Vec<&str> = entries.iter().map(|e| e["recorded"].as_str().unwrap()).collect();
        assert!(recorded.windows(2).all(|w| w[0] <= w[1]), "oldest first");
        let page = timeline("html");
        assert!(page.starts_with("<!doctype html>") && page.contains("Patient/p1"));
        assert!(!page.contains("<script") && page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "escaped");
        let csv = timeline("csv");
        assert!(csv.starts_with("recorded,kind,interaction,"));
        assert!(csv.contains("\"'=HYPERLINK(\"\"http://x\"\")\""), "a formula is neutralised: {csv}");

        // What exactly the gateway saw: its read of the updated Observation returned version 2 with
        // the new value, reproduced from the log; what the auditor saw of the trail, rendered again.
        let seen = |who: &[&str]| -> Vec<Value> {
            let mut args = vec!["investigate", "seen", "--from", "2026-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"];
            args.extend_from_slice(who);
            let (status, out, err) = d.cairn(&args);
            assert!(status.success(), "{out}{err}");
            out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
        };
        let by_gateway = seen(&["--client", &gateway.0]);
        let read = by_gateway
            .iter()
            .find(|a| a["interaction"] == "read" && a["request"] == format!("Observation/{first}"))
            .expect("the gateway's read");
        assert_eq!(read["returned"][0]["reference"], format!("Observation/{first}/_history/2"));
        assert_eq!(read["returned"][0]["resource"]["valueQuantity"]["value"], 150, "{read}");
        let searches = by_gateway.iter().filter(|a| a["interaction"] == "search-type").count();
        assert!(searches >= 2, "{searches}");
        assert!(
            by_gateway.iter().flat_map(|a| a["returned"].as_array().unwrap()).all(|v| v["resource"].is_object()),
            "every version the gateway was sent is reproduced"
        );
        let by_auditor = seen(&["--client", &auditor.0]);
        let trail_versions: Vec<&Value> = by_auditor.iter().flat_map(|a| a["returned"].as_array().unwrap()).collect();
        assert!(trail_versions.iter().any(|v| v["resource"]["resourceType"] == "AuditEvent"));
        assert!(trail_versions.iter().all(|v| v["resource"].is_object()), "audit records are rendered again");
                let (status, _, err) = d.cairn(&["investigate", "seen", "--from", "2026-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"]);
        assert_eq!(status.code(), Some(2), "--user or --client is required: {err}");

        // The same investigations as API operations, for an auditor: the same answers as the CLI's,
        // each recorded in the trail; a token without AuditEvent access is refused.
        let in_window = "from=2026-01-01T00:00:00Z&to=2100-01-01T00:00:00Z";
        let (s, t) = api.call(Method::GET, &format!("/Patient/p1/$timeline?{in_window}"), &au, None, &[]).await;
        assert_eq!(s, 200, "{t}");
        let over_api = t["entries"].as_array().unwrap();
        assert!(over_api.len() >= entries.len() && over_api[..entries.len()] == entries[..], "the CLI's timeline");
        let (s, o) = api.call(Method::GET, &format!("/$seen?client={}&{in_window}", gateway.0), &au, None, &[]).await;
        assert_eq!(s, 200, "{o}");
        assert_eq!(o["accesses"].as_array().unwrap()[..by_gateway.len()], by_gateway[..], "the CLI's answer");
        let (s, _) = api.call(Method::GET, &format!("/Patient/p1/$timeline?{in_window}"), &gw, None, &[]).await;
        assert_eq!(s, 403);
        let (s, o) = api.call(Method::GET, "/Patient/p1/$timeline?from=yesterday&to=2100-01-01T00:00:00Z", &au, None, &[]).await;
        assert_eq!((s, o["resourceType"].as_str()), (400, Some("OperationOutcome")), "{o}");
        let (s, _) = api.call(Method::GET, &format!("/$seen?{in_window}"), &au, None, &[]).await;
        assert_eq!(s, 400, "user or client is required");
        let operations = api.search_all("/AuditEvent?subtype=operation&_count=200", &au).await;
        let queries: Vec<String> = operations
            .iter()
            .flat_map(|e| e["entity"].as_array().unwrap())
            .filter_map(|en| en["query"].as_str())
            .map(|q| String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, q).unwrap()).unwrap())
            .collect();
        assert!(queries.iter().any(|q| q.starts_with("Patient?$timeline")), "{queries:?}");
        assert!(queries.iter().any(|q| q.starts_with("?$seen&client=")), "{queries:?}");
                let refused_timeline = operations.iter().any(|e| {
            e["outcomeDesc"].as_str().is_some_and(|d| d.contains("HTTP 403")) && e["entity"].to_string().contains("Patient/p1")
        });
        assert!(refused_timeline, "the refused timeline is recorded against the patient");
                // A request no route takes is refused and recorded like any other.
        let (s, o) = api.call(Method::PATCH, &format!("/Observation/{first}"), &gw, None, &[]).await;
        assert_eq!((s, o["resourceType"].as_str()), (405, Some("OperationOutcome")), "{o}");
        let (s, o) = api.call(Method::GET, "/Observation/x/y/z", &gw, None, &[]).await;
        assert_eq!((s, o["resourceType"].as_str()), (404, Some("OperationOutcome")), "{o}");
        let newest = api.search_all("/AuditEvent?_sort=-date&_count=50", &au).await;
        let said: Vec<&str> = newest.iter().filter_map(|e| e["outcomeDesc"].as_str()).collect();
        assert!(said.iter().any(|d| d.contains("HTTP 405") && d.contains("PATCH")), "{said:?}");
        assert!(said.iter().any(|d| d.contains("HTTP 404") && d.contains("not a FHIR interaction")), "{said:?}");
        // $seen's record names every version it sent, so each patient's accounting shows it.
        let seen_records: Vec<&Value> =
            operations.iter().filter(|e| e["entity"].to_string().contains("_history/") && e["outcome"] == "0").collect();
        assert!(
            seen_records.iter().any(|e| e["entity"].to_string().contains(&format!("Observation/{first}/_history/2"))),
            "the $seen answer's versions are in its record"
        );

        // And the whole log, against the same JWKS.
        let (status, out, err) = d.cairn(&["audit", "verify", "--jwks", jwks_file.to_str().unwrap()]);
        assert!(status.success() && !out.contains("warning"), "{out}{err}");
    });
    assert!(server.terminate().0.success());
}

cairn_tests::on_every_backend!(the_audit_trail_of_a_realistic_run);

/// SIGKILL under mixed load: after the restart, every request that got an answer (a write, a read, a
/// search, a refusal) has its AuditEvent, found by its request id. Answers are sent only after their
/// record is durable, so a kill can lose only requests nobody was answered for.
#[test]
fn every_answered_request_is_in_the_trail_after_a_crash() {
    use std::sync::{Arc, Mutex};
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(tmp.path(), &["--insecure-no-auth"]);
    let base = format!("{}/fhir", s.base_url);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let answered: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let mut tasks = Vec::new();
        for w in 0..6 {
            let (http, base, answered) = (http.clone(), base.clone(), answered.clone());
            tasks.push(tokio::spawn(async move {
                let mut last_id: Option<String> = None;
                for i in 0.. {
                    let request_id = format!("crash-{w}-{i}");
                    let req = match (w % 3, i % 4, &last_id) {
                        // Writers, with an invalid body now and then (a refusal to record).
                        (0, 3, _) => {
                            http.post(format!("{base}/Observation")).body("{\"resourceType\":\"Observation\"}")
                        }
                        (0, _, _) | (1, 0, _) => http.post(format!("{base}/Observation")).body(
                            serde_json::to_vec(&observation(&format!("Patient/c{}", i % 5), 100, &request_id)).unwrap(),
                        ),
                        // Readers of what was written, and searchers.
                        (1, _, Some(id)) => http.get(format!("{base}/Observation/{id}")),
                        _ => http.get(format!("{base}/Observation?patient=Patient/c{}&_count=5", i % 5)),
                    };
                    let r = req
                        .header("content-type", "application/fhir+json")
                        .header("x-request-id", &request_id)
                        .send()
                        .await;
                    let Ok(r) = r else { break };
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    if status == 201 {
                        last_id = body["id"].as_str().map(str::to_owned);
                    }
                    answered.lock().unwrap().push((request_id, status));
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        s.kill();
        for t in tasks {
            let _ = t.await;
        }
    });
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > 50, "only {} answers before the kill", answered.len());
    assert!(answered.iter().any(|(_, s)| *s == 400), "no refusal in the mix");
    let s = Server::start(tmp.path(), &["--insecure-no-auth"]);
    let api = Api { http: reqwest::Client::new(), base: s.base_url.clone() };
    let recorded: BTreeSet<String> = rt.block_on(async {
        api.search_all("/AuditEvent?_count=1000", "unused").await.iter().filter_map(transaction_id).collect()
    });
    let missing: Vec<&(String, u16)> = answered.iter().filter(|(id, _)| !recorded.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered requests have no AuditEvent: {:?}",
        missing.len(),
        answered.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!("crash: {} answered requests, every one in the trail after the restart", answered.len());
    assert!(s.terminate().0.success());
}
