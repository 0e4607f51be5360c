//! One behaviour suite for every `ResourceStore` backend: the embedded redb store and the CQL store
//! (ScyllaDB in production, Cassandra here) must answer every query alike.

use cairn_store::embedded::EmbeddedStore;
use cairn_store::{Checkpoint, ResourceStore, ResourceVersion};
use cairn_store_scylla::{ScyllaSettings, ScyllaStore};
use cairn_tests::{scylla_nodes, unique_name};
use serde_json::json;

#[tokio::test]
async fn embedded_store_behaves_like_a_resource_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(tmp.path().join("r.redb")).unwrap();
    conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Cassandra: run with infra/test (it starts Cassandra and sets CAIRN_SCYLLA_NODES)"]
async fn cql_store_behaves_like_a_resource_store() {
    let settings = ScyllaSettings::new(scylla_nodes(), unique_name("conf"));
    let store = ScyllaStore::connect_and_migrate(&settings).await.expect("connect to Cassandra and create the schema");
    let cql_digest = conformance(&store).await;
    // Migrating again applies nothing and keeps the data.
    assert!(cairn_store_scylla::migrate(&settings).await.unwrap().is_empty());
    assert_eq!(store.digest().await.unwrap(), cql_digest);
    // The same writes give the same digest in both backends.
    let tmp = tempfile::tempdir().unwrap();
    let embedded = EmbeddedStore::open(tmp.path().join("r.redb")).unwrap();
    assert_eq!(conformance(&embedded).await, cql_digest);
    store.drop_keyspace().await.unwrap();
}

fn version(id: &str, v: u64, patient: &str, deleted: bool) -> ResourceVersion {
    ResourceVersion {
        resource_type: "Observation".into(),
        id: id.into(),
        version_id: v,
        last_updated: format!("2026-11-28T10:00:0{v}.000Z"),
        last_updated_ms: 1_795_000_000_000 + v as i64 * 1000,
        deleted,
        resource: (!deleted).then(|| {
            serde_json::value::to_raw_value(&json!({"resourceType": "Observation", "id": id, "status": "final"}))
                .unwrap()
        }),
        fact: false,
        patient: Some(patient.into()),
        identifiers: vec![format!("urn:sys|{id}")],
        date_key: Some(v as i64 * 100),
        parsed: None,
    }
}

/// Versions, current, history, every index, idempotent replay, deletions, counts, changes and the
/// digest, as the FHIR API and the projector use them.
/// Returns the final digest.
async fn conformance(store: &dyn ResourceStore) -> String {
    let cp = |o| Checkpoint { topic: "cairn.fhir".into(), partition: 3, next_offset: o };
    store
        .apply(&[version("a", 1, "Patient/p1", false), version("b", 1, "Patient/p2", false)], &[cp(2)], false)
        .await
        .unwrap();
    store.apply(&[version("a", 2, "Patient/p2", false)], &[cp(3)], true).await.unwrap();
    assert_eq!(store.checkpoint("cairn.fhir", 3).await.unwrap(), Some(3));
    assert_eq!(store.current("Observation", "a").await.unwrap().unwrap().version_id, 2);
    assert_eq!(
        store.history("Observation", "a").await.unwrap().iter().map(|v| v.version_id).collect::<Vec<_>>(),
        vec![2, 1]
    );
    let mut seen = Vec::new();
    store
        .scan_current("Observation", Some("Patient/p2"), &mut |v| {
            seen.push(v.id);
            true
        })
        .await
        .unwrap();
    seen.sort();
    assert_eq!(seen, vec!["a", "b"], "a moved to p2 with its new version");
    let mut seen = Vec::new();
    store
        .scan_current("Observation", Some("Patient/p1"), &mut |v| {
            seen.push(v.id);
            true
        })
        .await
        .unwrap();
    assert!(seen.is_empty());
    assert_eq!(store.find_by_identifier("Observation", "urn:sys|a").await.unwrap(), vec!["a"]);
    let mut seen = Vec::new();
    store
        .scan_patient_dates("Observation", "Patient/p2", 150, 250, &mut |v| {
            seen.push((v.id, v.version_id));
            true
        })
        .await
        .unwrap();
    assert_eq!(seen, vec![("a".to_owned(), 2)], "only a's current version, by its date key");
    let mut seen = Vec::new();
    store
        .scan_patient_dates("Observation", "Patient/p2", 0, 150, &mut |v| {
            seen.push(v.id);
            true
        })
        .await
        .unwrap();
    assert_eq!(seen, vec!["b"]);

    // Replaying the same versions changes nothing.
    let before = store.digest().await.unwrap();
    store
        .apply(&[version("a", 1, "Patient/p1", false), version("a", 2, "Patient/p2", false)], &[cp(3)], false)
        .await
        .unwrap();
    assert_eq!(store.digest().await.unwrap(), before);

    // A deletion is a version; the resource leaves the indexes.
    store.apply(&[version("a", 3, "Patient/p2", true)], &[cp(4)], false).await.unwrap();
    assert!(store.current("Observation", "a").await.unwrap().unwrap().deleted);
    assert!(store.find_by_identifier("Observation", "urn:sys|a").await.unwrap().is_empty());
    let mut seen = Vec::new();
    store
        .scan_current("Observation", None, &mut |v| {
            seen.push(v.id);
            true
        })
        .await
        .unwrap();
    assert_eq!(seen, vec!["b"]);
    assert_eq!(store.count_current("Observation").await.unwrap(), 1);
    assert_eq!(store.count_current("Patient").await.unwrap(), 0);
    let changes = store.changes(Some("Observation"), 0, i64::MAX, 10).await.unwrap();
    assert_eq!(changes.len(), 4);
    assert_eq!(changes[0].version_id, 3, "newest first");
    assert_eq!(store.changes(None, 0, 1_795_000_001_500, 10).await.unwrap().len(), 2);

    // A visitor that stops early is not called again.
    let mut calls = 0;
    store.apply(&[version("c", 1, "Patient/p2", false)], &[cp(5)], false).await.unwrap();
    store
        .scan_current("Observation", None, &mut |_| {
            calls += 1;
            false
        })
        .await
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(store.version("Observation", "a", 1).await.unwrap().unwrap().patient.as_deref(), Some("Patient/p1"));
    assert!(store.version("Observation", "a", 9).await.unwrap().is_none());
    assert!(store.current("Observation", "nobody").await.unwrap().is_none());
    assert_eq!(store.checkpoint("cairn.fhir", 3).await.unwrap(), Some(5));
    assert_eq!(store.checkpoint("cairn.fhir", 4).await.unwrap(), None);

    // A version arriving after a newer one is history only: the newer stays current and indexed.
    store.apply(&[version("d", 2, "Patient/p1", false)], &[cp(6)], false).await.unwrap();
    store.apply(&[version("d", 1, "Patient/p3", false)], &[cp(6)], false).await.unwrap();
    assert_eq!(store.current("Observation", "d").await.unwrap().unwrap().version_id, 2);
    assert_eq!(
        store.history("Observation", "d").await.unwrap().iter().map(|v| v.version_id).collect::<Vec<_>>(),
        vec![2, 1]
    );
    for (patient, expected) in [("Patient/p1", vec!["d"]), ("Patient/p3", vec![])] {
        let mut seen = Vec::new();
        store
            .scan_current("Observation", Some(patient), &mut |v| {
                seen.push(v.id);
                true
            })
            .await
            .unwrap();
        assert_eq!(seen, expected, "{patient}");
    }

    // A compartment holds resources with a date key and without (the embedded store keeps them in
    // two indexes): a scan finds each once, through updates that add and drop the date key.
    let with = |id: &str, v: u64, resource_type: &str, date_key: Option<i64>| ResourceVersion {
        resource_type: resource_type.into(),
        date_key,
        ..version(id, v, "Patient/p9", false)
    };
    store
        .apply(
            &[
                with("m1", 1, "Observation", Some(300)),
                with("m2", 1, "Observation", Some(100)),
                with("m3", 1, "Observation", None),
                with("dev", 1, "Device", None),
            ],
            &[cp(7)],
            false,
        )
        .await
        .unwrap();
    let compartment = |resource_type: &'static str| async move {
        let mut seen = Vec::new();
        store
            .scan_current(resource_type, Some("Patient/p9"), &mut |v| {
                seen.push(v.id);
                true
            })
            .await
            .unwrap();
        seen.sort();
        seen
    };
    assert_eq!(compartment("Observation").await, ["m1", "m2", "m3"]);
    assert_eq!(compartment("Device").await, ["dev"]);
    store
        .apply(&[with("m1", 2, "Observation", None), with("m3", 2, "Observation", Some(200))], &[cp(8)], false)
        .await
        .unwrap();
    assert_eq!(compartment("Observation").await, ["m1", "m2", "m3"]);
    store.digest().await.unwrap()
}
