use super::*;
use cairn_events::{EventType, sample_event};

#[test]
fn every_audited_event_type_gives_deterministic_records() {
    for t in EventType::ALL {
        let e = sample_event(t);
        assert_eq!(audit_events(&e), audit_events(&e), "{t}");
        for r in audit_events(&e) {
            assert_eq!(r.resource["resourceType"], "AuditEvent");
            assert_eq!(r.resource["recorded"], e.occurred_at.to_rfc3339(), "{t}: time comes from the event");
            assert!(r.resource["agent"].as_array().is_some_and(|a| !a.is_empty()), "{t}");
            assert!(r.resource["agent"].as_array().unwrap().iter().all(|a| a["requestor"].is_boolean()), "{t}");
            assert!(r.resource["source"]["observer"].is_object(), "{t}");
        }
    }
}

#[test]
fn a_read_follows_balp_with_the_token_as_policy() {
    let e = sample_event(EventType::FhirAccessRead);
    let records = audit_events(&e);
    assert_eq!(records.len(), 1);
    let a = &records[0].resource;
    assert_eq!(a["type"]["code"], "rest");
    assert_eq!(a["subtype"][0]["code"], "read");
    assert_eq!(a["action"], "R");
    assert_eq!(a["outcome"], "0");
    // Read: the client receives (110152), the server sends (110153); the user is the requestor.
    assert_eq!(a["agent"][0]["type"]["coding"][0]["code"], "110152");
    assert_eq!(a["agent"][1]["type"]["coding"][0]["code"], "110153");
    assert_eq!(a["agent"][2]["requestor"], true);
    assert_eq!(a["agent"][2]["policy"][0], "urn:ietf:params:oauth:jti:0f9c4f0e-7a43-4d1f-8b7e-2d1c3f9a5b11");
    assert_eq!(a["agent"][2]["who"]["reference"], "Patient/p-1");
    let entities = a["entity"].as_array().unwrap();
    assert!(entities.iter().any(|x| x["what"]["reference"] == "Observation/obs-1/_history/2"));
    assert!(entities.iter().any(|x| x["what"]["reference"] == "Patient/p-1" && x["role"]["code"] == "1"));
    assert!(entities.iter().any(|x| x["what"]["identifier"]["value"] == "req-42"));
    assert_eq!(records[0].patient.as_deref(), Some("Patient/p-1"));
}

#[test]
fn a_search_across_patients_gives_one_record_per_patient() {
    let mut e = sample_event(EventType::FhirAccessSearch);
    let cairn_events::Payload::AccessSearch(s) = &mut e.payload else { unreachable!() };
    s.returned = ["p-1", "p-2", "p-1"]
        .iter()
        .enumerate()
        .map(|(i, p)| cairn_events::VersionedRef {
            resource_type: "Observation".into(),
            id: format!("o-{i}"),
            version_id: 1,
            patient: Some(format!("Patient/{p}")),
        })
        .collect();
    let records = audit_events(&e);
    let keys: Vec<(String, Option<String>)> = record_keys(&e).into_iter().map(|k| (k.id, k.patient)).collect();
    assert_eq!(keys, records.iter().map(|r| (r.id.clone(), r.patient.clone())).collect::<Vec<_>>());
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].patient.as_deref(), Some("Patient/p-1"));
    assert_eq!(records[1].patient.as_deref(), Some("Patient/p-2"));
    assert_ne!(records[0].id, records[1].id);
    let first = records[0].resource["entity"].as_array().unwrap();
    // the query, two versions of p-1's data, the patient, the transaction
    assert_eq!(first.len(), 5, "{first:?}");
    assert_eq!(first[0]["role"]["code"], "24");
    assert!(first[0]["query"].as_str().is_some_and(|q| !q.is_empty()));
}

#[test]
fn refusals_and_failed_logins_have_failure_outcomes() {
    let refused = audit_events(&sample_event(EventType::FhirRequestRefused));
    assert_eq!(refused[0].resource["outcome"], "4");
    assert_eq!(refused[0].resource["action"], "U");
    assert!(refused[0].resource["outcomeDesc"].as_str().unwrap().contains("412"));
    let failed = audit_events(&sample_event(EventType::AuthLoginFailed));
    assert_eq!(failed[0].resource["type"]["code"], "110114");
    assert_eq!(failed[0].resource["subtype"][0]["code"], "110122");
    assert_eq!(failed[0].resource["outcome"], "4");
    let token_refused = audit_events(&sample_event(EventType::AuthTokenRefused));
    assert_eq!(token_refused[0].resource["outcome"], "4");
    assert_eq!(token_refused[0].resource["subtype"][0]["code"], "ITI-71");
}

#[test]
fn provenance_targets_the_version_written_and_names_the_replaced_one() {
    let e = sample_event(EventType::FhirResourceUpdated);
    let p = provenance(&e).expect("a write has a Provenance");
    let cairn_events::Payload::ResourceUpdated(w) = &e.payload else { unreachable!() };
    assert_eq!(p.resource["target"][0]["reference"], format!("{}/{}/_history/{}", w.resource_type, w.id, w.version_id));
    assert_eq!(p.resource["activity"]["coding"][0]["code"], "UPDATE");
    assert_eq!(p.resource["recorded"], e.occurred_at.to_rfc3339());
    if w.version_id > 1 {
        assert_eq!(p.resource["entity"][0]["role"], "revision");
    }
    assert!(provenance(&sample_event(EventType::FhirAccessRead)).is_none());
}

#[test]
fn a_timeline_puts_the_sign_in_and_the_grant_before_the_access_that_used_them() {
    use crate::timeline::TimelineBuilder;
    use cairn_events::{Payload, Timestamp};
    let at = |ms: i64| Timestamp::from_millis(1_800_000_000_000 + ms);
    let read = {
        let mut e = sample_event(EventType::FhirAccessRead);
        e.occurred_at = at(3_000);
        e
    };
    let jti = read.actor.jti.clone().expect("the sample read carries a token");
    let user = "u-7".to_owned();
    let login = |ms: i64| {
        let mut e = sample_event(EventType::AuthLoginSucceeded);
        let Payload::LoginSucceeded(l) = &mut e.payload else { unreachable!() };
        l.user_id = user.clone();
        e.occurred_at = at(ms);
        e.patient = None;
        e
    };
    let grant = |ms: i64, jti: &str| {
        let mut e = sample_event(EventType::AuthTokenIssued);
        let Payload::TokenIssued(t) = &mut e.payload else { unreachable!() };
        t.jti = jti.to_owned();
        t.subject = Some(user.clone());
        t.kind = cairn_events::TokenKind::Access;
        e.occurred_at = at(ms);
        e.patient = None;
        e
    };
    // Fed out of order, with a later sign-in and an unused grant that do not belong.
    let events = [
        (read.clone(), "a"),
        (login(2_500), "b"),
        (grant(2_000, &jti), "c"),
        (login(1_000), "d"),
        (grant(2_200, "other"), "e"),
    ];
    let mut builder = TimelineBuilder::new("Patient/p-1", at(0), at(10_000));
    for (e, pos) in &events {
        builder.add(e, pos.to_string());
    }
    let timeline = builder.finish();
    let kinds: Vec<(&str, &str)> = timeline.iter().map(|e| (e.kind, e.position.as_str())).collect();
    assert_eq!(kinds, [("login", "d"), ("token", "c"), ("access", "a")]);
    assert_eq!(timeline[1].summary.jti, jti);
    assert_eq!(timeline[2].summary.jti, jti);
    assert_eq!(timeline[0].summary.user, user);

    // A grant with the patient in context is on the timeline in its own right, once, as a grant.
    let mut builder = TimelineBuilder::new("Patient/p-1", at(0), at(10_000));
    let mut in_context = grant(2_000, &jti);
    in_context.patient = Some("Patient/p-1".into());
    builder.add(&in_context, "c".into());
    builder.add(&read, "a".into());
    let timeline = builder.finish();
    let kinds: Vec<(&str, &str)> = timeline.iter().map(|e| (e.kind, e.position.as_str())).collect();
    assert_eq!(kinds, [("token", "c"), ("access", "a")]);
}

#[test]
fn every_record_has_the_keys_given_and_renders_again_from_its_fact_without_the_body() {
    for t in EventType::ALL {
        let e = sample_event(t);
        let fact = fact(&e);
        if let Payload::ResourceCreated(w) | Payload::ResourceUpdated(w) = &e.payload {
            assert!(w.resource.get().len() > 20, "{t}: the sample carries a body");
            assert!(!fact.get().contains(w.resource.get()), "{t}: the body is stored once, as the resource");
        }
        let records: Vec<AuditRecord> = audit_events(&e).into_iter().chain(provenance(&e)).collect();
        let keys: Vec<RecordKey> = records.iter().map(AuditRecord::key).collect();
        assert_eq!(record_keys(&e), keys, "{t}: the keys are those of the rendered records");
        for r in &records {
            assert_eq!(render(r.resource_type, &r.id, fact.get()).as_ref(), Some(&r.resource), "{t}: {}", r.id);
        }
        assert_eq!(render("AuditEvent", "no-such-record", fact.get()), None, "{t}");
    }
    assert_eq!(render("AuditEvent", "x", "{\"not\": \"an event\"}"), None);
}
