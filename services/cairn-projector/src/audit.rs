//! The audit projection: AuditEvents (and, for writes, a Provenance) as stored versions. The shapes
//! are `cairn_audit`'s; this adds the index keys: the patient compartment, and for AuditEvents the
//! date-index key (`recorded`), so "who accessed patient X between T1 and T2" reads one patient's
//! records in one time window.
//!
//! The records of writes and FHIR accesses are stored as their fact (`cairn_audit::fact`: the event,
//! without a write's resource body), not rendered: [`Rendered`] renders them for every reader, so the
//! store holds a write's body once instead of three times. Records are rendered by the running build:
//! a change to the audit shapes changes how past records read (the facts, like the log, do not
//! change). Authentication events' records are stored rendered (`cairn_audit::stored_as_fact`).

use cairn_audit::RecordKey;
use cairn_events::Event;
use cairn_store::{Checkpoint, ResourceStore, ResourceVersion, Result, StoreError};
use std::sync::Arc;

pub fn project(event: &Event) -> Vec<ResourceVersion> {
    if !cairn_audit::stored_as_fact(event) {
        // Authentication events: their records are stored rendered (their events hold hashes of
        // secrets the records leave out).
        return cairn_audit::audit_events(event)
            .into_iter()
            .chain(cairn_audit::provenance(event))
            .map(|r| {
                let body = serde_json::value::to_raw_value(&r.resource).expect("JSON values serialize");
                version(r.key(), event.occurred_at.to_rfc3339(), body, false)
            })
            .collect();
    }
    let keys = cairn_audit::record_keys(event);
    if keys.is_empty() {
        return Vec::new();
    }
    let fact = cairn_audit::fact(event);
    let last_updated = event.occurred_at.to_rfc3339();
    keys.into_iter().map(|k| version(k, last_updated.clone(), fact.clone(), true)).collect()
}

fn version(k: RecordKey, last_updated: String, body: Box<serde_json::value::RawValue>, fact: bool) -> ResourceVersion {
    let date_key = (k.resource_type == "AuditEvent").then_some(k.recorded_ms);
    ResourceVersion {
        resource_type: k.resource_type.to_owned(),
        id: k.id,
        version_id: 1,
        last_updated,
        last_updated_ms: k.recorded_ms,
        deleted: false,
        resource: Some(body),
        fact,
        patient: k.patient,
        identifiers: Vec::new(),
        date_key,
        parsed: None,
    }
}

/// A version as readers see it: an audit record's fact rendered into the record.
fn render(v: ResourceVersion) -> Result<ResourceVersion> {
    render_keeping_tree(v, false)
}

/// [`render`], and with `keep_tree` the rendered record also left in `parsed`, for a scan whose
/// visitor matches it next: the record is not parsed back from the text just made of it.
fn render_keeping_tree(mut v: ResourceVersion, keep_tree: bool) -> Result<ResourceVersion> {
    if !v.fact {
        return Ok(v);
    }
    let fact = v.resource.as_ref().map(|r| r.get()).unwrap_or("null");
    let record = cairn_audit::render(&v.resource_type, &v.id, fact).ok_or_else(|| {
        StoreError::Corrupt(format!("{}/{}: its stored event does not render this record", v.resource_type, v.id))
    })?;
    v.resource = Some(serde_json::value::to_raw_value(&record).expect("JSON values serialize"));
    v.fact = false;
    if keep_tree {
        v.parsed = Some(record);
    }
    Ok(v)
}

/// The store as the FHIR API reads it: every audit record rendered from its fact. Writes and the
/// digest pass through untouched (the digest covers what is stored).
pub struct Rendered(pub Arc<dyn ResourceStore>);

impl Rendered {
    /// `store` as readers see it (wrapping twice is harmless: a rendered record is no fact).
    pub fn wrap(store: Arc<dyn ResourceStore>) -> Arc<dyn ResourceStore> {
        Arc::new(Rendered(store))
    }
}

/// Runs `visit` on rendered versions; a version that does not render stops the scan with its error.
fn rendering_visitor<'a>(
    visit: &'a mut (dyn FnMut(ResourceVersion) -> bool + Send),
    failed: &'a mut Option<StoreError>,
) -> impl FnMut(ResourceVersion) -> bool + Send + 'a {
    move |v| match render_keeping_tree(v, true) {
        Ok(v) => visit(v),
        Err(e) => {
            *failed = Some(e);
            false
        }
    }
}

#[async_trait::async_trait]
impl ResourceStore for Rendered {
    async fn apply(&self, versions: &[ResourceVersion], checkpoints: &[Checkpoint], durable: bool) -> Result<()> {
        self.0.apply(versions, checkpoints, durable).await
    }

    async fn checkpoint(&self, topic: &str, partition: u32) -> Result<Option<u64>> {
        self.0.checkpoint(topic, partition).await
    }

    async fn current(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        self.0.current(resource_type, id).await?.map(render).transpose()
    }

    async fn version(&self, resource_type: &str, id: &str, version_id: u64) -> Result<Option<ResourceVersion>> {
        self.0.version(resource_type, id, version_id).await?.map(render).transpose()
    }

    async fn history(&self, resource_type: &str, id: &str) -> Result<Vec<ResourceVersion>> {
        self.0.history(resource_type, id).await?.into_iter().map(render).collect()
    }

    async fn scan_current(
        &self,
        resource_type: &str,
        patient: Option<&str>,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<()> {
        let mut failed = None;
        self.0.scan_current(resource_type, patient, &mut rendering_visitor(visit, &mut failed)).await?;
        failed.map_or(Ok(()), Err)
    }

    async fn scan_patient_dates(
        &self,
        resource_type: &str,
        patient: &str,
        from: i64,
        to: i64,
        visit: &mut (dyn FnMut(ResourceVersion) -> bool + Send),
    ) -> Result<()> {
        let mut failed = None;
        self.0.scan_patient_dates(resource_type, patient, from, to, &mut rendering_visitor(visit, &mut failed)).await?;
        failed.map_or(Ok(()), Err)
    }

    async fn count_current(&self, resource_type: &str) -> Result<u64> {
        self.0.count_current(resource_type).await
    }

    async fn changes(
        &self,
        resource_type: Option<&str>,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<ResourceVersion>> {
        self.0.changes(resource_type, from_ms, to_ms, limit).await?.into_iter().map(render).collect()
    }

    async fn find_by_identifier(&self, resource_type: &str, identifier: &str) -> Result<Vec<String>> {
        self.0.find_by_identifier(resource_type, identifier).await
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: std::time::Duration) -> Result<bool> {
        self.0.acquire_lease(name, holder, ttl).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        self.0.release_lease(name, holder).await
    }

    async fn digest(&self) -> Result<String> {
        self.0.digest().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_events::{EventType, Payload, sample_event};

    /// What a reader gets for every stored record of an event: the rendered record, whether the
    /// store kept its fact or the record itself; and no authentication event's secret hashes are
    /// stored.
    #[test]
    fn every_stored_record_reads_as_rendered_and_no_secret_hash_is_stored() {
        for t in EventType::ALL {
            let e = sample_event(t);
            let rendered: Vec<_> =
                cairn_audit::audit_events(&e).into_iter().chain(cairn_audit::provenance(&e)).collect();
            let stored = project(&e);
            assert_eq!(stored.len(), rendered.len(), "{t}");
            for (v, r) in stored.iter().zip(&rendered) {
                assert_eq!(v.fact, cairn_audit::stored_as_fact(&e), "{t}");
                let read = render(v.clone()).unwrap();
                let body: serde_json::Value = serde_json::from_str(read.resource.as_ref().unwrap().get()).unwrap();
                assert_eq!((read.id.as_str(), &body), (r.id.as_str(), &r.resource), "{t}");
                assert!(!read.fact);
            }
            // A scan's visitor gets the same record as a tree; the tree is never stored.
            for v in &stored {
                let scanned = render_keeping_tree(v.clone(), true).unwrap();
                let text: serde_json::Value = serde_json::from_str(scanned.resource.as_ref().unwrap().get()).unwrap();
                match &scanned.parsed {
                    Some(tree) => assert_eq!(tree, &text, "{t}"),
                    None => assert!(!v.fact, "{t}: a rendered fact keeps its tree"),
                }
                assert_eq!(scanned.encode(), render(v.clone()).unwrap().encode(), "{t}");
            }
            let secrets: Vec<String> = match &e.payload {
                Payload::UserCreated(u) => vec![u.password_hash.clone()],
                Payload::ClientRegistered(c) => c.secret_sha256.iter().cloned().collect(),
                _ => Vec::new(),
            };
            for secret in secrets.iter().filter(|s| !s.is_empty()) {
                for v in &stored {
                    assert!(
                        !v.resource.as_ref().unwrap().get().contains(secret.as_str()),
                        "{t}: a secret hash is stored"
                    );
                }
            }
        }
    }
}
