//! Batch and transaction Bundles posted to the base.
//!
//! A transaction's writes become one `append_batch`: after a crash either every entry's event is in
//! the log or none is, and nothing is visible before all are durable. `urn:uuid:` fullUrls are
//! replaced by the ids the server assigns, in every reference of every entry; conditional references
//! (`Patient?identifier=...`) are resolved to the one match. A batch processes entries independently,
//! but still appends its plain creates in one group so a gateway uploading 100 readings pays for one
//! durable append, not a hundred.

use crate::{
    FhirError, FhirResult, FhirService, Permission, RequestContext, ReturnPreference, Versioned, WriteOutcome,
    new_resource_id, parse_etag,
};
use cairn_events::{Event, ResourceDeleted, Timestamp};
use cairn_fhir::outcome::{IssueCode, operation_outcome};
use cairn_fhir::{index, resource, search};
use cairn_log::NewRecord;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
}

struct Entry {
    full_url: Option<String>,
    method: Method,
    /// Relative URL: `Observation`, `Observation/123`, `Observation?code=...`.
    url: String,
    resource: Option<Value>,
    if_none_exist: Option<String>,
    if_match: Option<String>,
}

fn entry_error(index: usize, diagnostics: impl Into<String>) -> FhirError {
    FhirError::new(400, IssueCode::Invalid, diagnostics).at_entry(index)
}

impl FhirError {
    /// Points every issue at the entry: diagnostics prefixed, `Observation.code` becomes
    /// `Bundle.entry[i].resource.code`.
    fn at_entry(mut self, index: usize) -> FhirError {
        let prefix = format!("Bundle.entry[{index}]");
        for issue in &mut self.issues {
            if !issue.diagnostics.starts_with(&prefix) {
                issue.diagnostics = format!("{prefix}: {}", issue.diagnostics);
            }
            issue.expression = Some(match issue.expression.take() {
                Some(e) if e.starts_with("Bundle.") => e,
                Some(e) => match e.split_once('.') {
                    Some((_, rest)) => format!("{prefix}.resource.{rest}"),
                    None => format!("{prefix}.resource"),
                },
                None => prefix.clone(),
            });
        }
        self
    }
}

/// The entries of `bundle`, each resource moved out of it (the Bundle is not needed afterwards).
fn parse_entries(bundle: &mut Value) -> FhirResult<Vec<Entry>> {
    let Some(entries) = bundle.get_mut("entry") else { return Ok(Vec::new()) };
    let entries = entries
        .as_array_mut()
        .ok_or_else(|| FhirError::new(400, IssueCode::Structure, "Bundle.entry must be an array"))?;
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter_mut().enumerate() {
        let request = e.get("request").ok_or_else(|| entry_error(i, "request is required"))?;
        let method = match request.get("method").and_then(Value::as_str) {
            Some("GET") => Method::Get,
            Some("POST") => Method::Post,
            Some("PUT") => Method::Put,
            Some("DELETE") => Method::Delete,
            Some(other) => return Err(entry_error(i, format!("request.method {other} is not supported"))),
            None => return Err(entry_error(i, "request.method is required")),
        };
        let url = request
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| entry_error(i, "request.url is required"))?
            .trim_start_matches('/')
            .to_owned();
        let text = |k: &str| request.get(k).and_then(Value::as_str).map(str::to_owned);
        let (if_none_exist, if_match) = (text("ifNoneExist"), text("ifMatch"));
        let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_owned);
        let resource = e.get_mut("resource").map(Value::take);
        if matches!(method, Method::Post | Method::Put) && resource.is_none() {
            return Err(entry_error(i, "a POST or PUT entry needs a resource"));
        }
        out.push(Entry { full_url, method, url, resource, if_none_exist, if_match });
    }
    Ok(out)
}

/// `Observation` -> (type, None, None); `Observation/1` -> (type, Some(id), None); `Observation?x=y`
/// -> (type, None, Some(query)).
fn split_url(url: &str) -> (String, Option<String>, Option<String>) {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (url, None),
    };
    let mut parts = path.splitn(2, '/');
    let t = parts.next().unwrap_or_default().to_owned();
    (t, parts.next().map(str::to_owned), query)
}

/// Replaces every `reference` found in `mapping` (urn:uuid -> Type/id).
fn rewrite_references(value: &mut Value, mapping: &HashMap<String, String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "reference" {
                    if let Some(target) = v.as_str().and_then(|r| mapping.get(r)) {
                        *v = Value::String(target.clone());
                    }
                } else {
                    rewrite_references(v, mapping);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_references(v, mapping)),
        _ => {}
    }
}

/// Collects conditional references (`Type?query`) anywhere in a resource.
fn conditional_references(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v.as_str()) {
                    ("reference", Some(r)) if r.contains('?') && !r.starts_with("urn:") && !r.starts_with("http") => {
                        out.insert(r.to_owned());
                    }
                    _ => conditional_references(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| conditional_references(v, out)),
        _ => {}
    }
}

/// A response entry: status, location, etag and lastModified, and what `ret` asks for of the
/// resource (reads pass `Representation`: the resource is what they are for).
fn response_entry(status: &str, v: Option<Versioned>, resource_type: &str, base: &str, ret: ReturnPreference) -> Value {
    let mut response = json!({"status": status});
    let mut entry = json!({});
    if let Some(v) = v {
        response["location"] = json!(format!("{resource_type}/{}/_history/{}", v.id, v.version_id));
        response["etag"] = json!(format!("W/\"{}\"", v.version_id));
        response["lastModified"] = json!(v.last_updated);
        entry["fullUrl"] = json!(format!("{base}/{resource_type}/{}", v.id));
        match ret {
            ReturnPreference::Representation => entry["resource"] = v.resource,
            ReturnPreference::Minimal => {}
            ReturnPreference::OperationOutcome => {
                let issue = cairn_fhir::outcome::Issue::information(format!(
                    "{resource_type}/{} version {}",
                    v.id, v.version_id
                ));
                response["outcome"] = operation_outcome(&[issue]);
            }
        }
    }
    entry["response"] = response;
    entry
}

fn error_entry(e: &FhirError) -> Value {
    json!({"response": {"status": e.status.to_string(), "outcome": operation_outcome(&e.issues)}})
}

impl FhirService {
    /// POST of a Bundle to the base: `batch` or `transaction`.
    /// A batch or transaction Bundle. A refused Bundle is recorded before it is answered; so is each
    /// refused entry of a batch.
    pub async fn bundle(&self, ctx: &RequestContext, body: &[u8], ret: ReturnPreference) -> FhirResult<Value> {
        let mut kind = "batch";
        let result = self.bundle_unaudited(ctx, body, ret, &mut kind).await;
        self.audited(ctx, kind, None, None, result).await
    }

    async fn bundle_unaudited(
        &self,
        ctx: &RequestContext,
        body: &[u8],
        ret: ReturnPreference,
        kind: &mut &'static str,
    ) -> FhirResult<Value> {
        if body.len() > self.settings.max_bundle_bytes {
            return Err(FhirError::new(
                413,
                IssueCode::TooLong,
                format!("the Bundle exceeds the {}-byte limit", self.settings.max_bundle_bytes),
            ));
        }
        let mut bundle = resource::parse_json(body).map_err(FhirError::invalid)?;
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(FhirError::new(400, IssueCode::Invalid, "POST to the base takes a Bundle"));
        }
        if bundle.get("type").and_then(Value::as_str) == Some("transaction") {
            *kind = "transaction";
        }
        let kind_of_bundle = bundle.get("type").and_then(Value::as_str).map(str::to_owned);
        let entries = parse_entries(&mut bundle)?;
        match kind_of_bundle.as_deref() {
            // A transaction writes (its GET entries are refused), so a read-only view refuses it
            // whole; a batch's entries stand alone, so its reads are answered there and each write
            // entry gets its own 405.
            Some("transaction") => {
                self.check_writable()?;
                self.transaction(ctx, entries, ret).await
            }
            Some("batch") => self.batch(ctx, entries, ret).await,
            other => Err(FhirError::new(
                400,
                IssueCode::Invalid,
                format!("Bundle.type {other:?}: only batch and transaction are processed"),
            )),
        }
    }

    async fn transaction(&self, ctx: &RequestContext, entries: Vec<Entry>, ret: ReturnPreference) -> FhirResult<Value> {
        let base = self.settings.base_url.clone();
        // Lock every resource the transaction updates or deletes, in shard order (no deadlock).
        let mut shards = BTreeSet::new();
        for e in &entries {
            match (&e.method, split_url(&e.url)) {
                (Method::Put | Method::Delete, (t, Some(id), None)) => {
                    shards.insert(self.shard_of(&format!("{t}/{id}")));
                }
                // The same lock as a conditional create through the type endpoint.
                (Method::Post, (t, None, None)) => {
                    if let Some(q) = &e.if_none_exist {
                        shards.insert(self.shard_of(&format!("{t}?{q}")));
                    }
                }
                _ => {}
            }
        }
        let _guard = self.write_lock(shards).await?;
        self.caught_up(None).await?;

        // Pass 1: ids for creates, conditional creates resolved, the urn:uuid mapping.
        let now = Timestamp::now().to_rfc3339();
        let mut mapping = HashMap::new();
        let mut plans: Vec<(usize, String, String, Option<u64>)> = Vec::new(); // (entry, type, id, existing version for conditional hits)
        for (i, e) in entries.iter().enumerate() {
            let (t, id, query) = split_url(&e.url);
            Self::check_type(&t).map_err(|err| err.at_entry(i))?;
            let (id, existing) = match (&e.method, id, query) {
                (Method::Post, None, None) => match &e.if_none_exist {
                    Some(q) => {
                        let (parsed, _) = search::parse_query(&t, q, false)
                            .map_err(|err| entry_error(i, format!("ifNoneExist: {err}")))?;
                        let mut found = Vec::new();
                        self.scan(&t, &parsed, &mut |v, _| {
                            found.push(v);
                            found.len() < 2
                        })
                        .await?;
                        match found.len() {
                            0 => (new_resource_id(), None),
                            1 => (found[0].id.clone(), Some(found[0].version_id)),
                            _ => {
                                return Err(FhirError::new(
                                    412,
                                    IssueCode::Duplicate,
                                    format!("Bundle.entry[{i}]: ifNoneExist matches several resources"),
                                ));
                            }
                        }
                    }
                    None => (new_resource_id(), None),
                },
                (Method::Put | Method::Delete, Some(id), None) => {
                    Self::check_id(&id).map_err(|err| err.at_entry(i))?;
                    (id, None)
                }
                (Method::Get, _, _) => {
                    return Err(entry_error(
                        i,
                        "GET entries are not allowed in a transaction by this server; use a batch",
                    ));
                }
                _ => return Err(entry_error(i, format!("request.url `{}` does not fit the method", e.url))),
            };
            if let Some(full) = &e.full_url
                && full.starts_with("urn:uuid:")
            {
                mapping.insert(full.clone(), format!("{t}/{id}"));
            }
            plans.push((i, t, id, existing));
        }

        // Conditional references, resolved once each.
        let mut conditional = BTreeSet::new();
        for e in &entries {
            if let Some(r) = &e.resource {
                conditional_references(r, &mut conditional);
            }
        }
        for reference in conditional {
            let (t, _, q) = split_url(&reference);
            let (parsed, _) = search::parse_query(&t, q.as_deref().unwrap_or(""), false).map_err(|err| {
                FhirError::new(400, IssueCode::Invalid, format!("conditional reference {reference}: {err}"))
            })?;
            let mut found = Vec::new();
            self.scan(&t, &parsed, &mut |v, _| {
                found.push(v.id);
                found.len() < 2
            })
            .await?;
            match found.as_slice() {
                [one] => {
                    mapping.insert(reference, format!("{t}/{one}"));
                }
                [] => {
                    return Err(FhirError::new(
                        412,
                        IssueCode::NotFound,
                        format!("conditional reference {reference} matches nothing"),
                    ));
                }
                _ => {
                    return Err(FhirError::new(
                        412,
                        IssueCode::Duplicate,
                        format!("conditional reference {reference} matches several resources"),
                    ));
                }
            }
        }

        // Pass 2: validate, stamp, build every event; nothing is appended unless all are fine.
        let mut events = Vec::new();
        let mut responses = Vec::new();
        for (i, t, id, existing) in plans {
            let e = &entries[i];
            let permission = match e.method {
                Method::Post => Permission::Create,
                Method::Put => Permission::Update,
                Method::Delete => Permission::Delete,
                Method::Get => Permission::Read,
            };
            let permit = ctx.access.permit(permission, &t).map_err(|err| err.at_entry(i))?;
            match e.method {
                Method::Post if existing.is_some() => {
                    let found =
                        self.store.current(&t, &id).await.map_err(|err| FhirError::unavailable(err.to_string()))?;
                    let read = ctx.access.permit(Permission::Read, &t).map_err(|err| err.at_entry(i))?;
                    if found.as_ref().is_some_and(|f| !read.admits_version(f)) {
                        return Err(FhirError::outside_compartment("the resource ifNoneExist matched").at_entry(i));
                    }
                    let v = found.map(Versioned::from);
                    responses.push(response_entry("200 OK", v, &t, &base, ret));
                }
                Method::Post | Method::Put => {
                    let mut r = e.resource.clone().expect("checked in parse_entries");
                    rewrite_references(&mut r, &mapping);
                    if let Method::Put = e.method
                        && r.get("id").and_then(Value::as_str) != Some(id.as_str())
                    {
                        return Err(entry_error(i, format!("the resource id must be `{id}`, as in request.url")));
                    }
                    resource::validate(&r, &t).map_err(|issues| FhirError::invalid(issues).at_entry(i))?;
                    let current = match e.method {
                        Method::Put => {
                            self.store.current(&t, &id).await.map_err(|err| FhirError::unavailable(err.to_string()))?
                        }
                        _ => None,
                    };
                    if current.as_ref().is_some_and(|c| !permit.admits_version(c)) {
                        return Err(FhirError::concealed(&t, &id).at_entry(i));
                    }
                    if current.is_none() && matches!(e.method, Method::Put) {
                        ctx.access.permit(Permission::Create, &t).map_err(|err| err.at_entry(i))?;
                    }
                    if !permit.admits(&t, index::patient_of(&t, &id, &r).as_deref(), Some(&r)) {
                        return Err(FhirError::outside_compartment("the resource").at_entry(i));
                    }
                    if let Some(tag) = &e.if_match {
                        let expected =
                            parse_etag(tag).ok_or_else(|| entry_error(i, format!("ifMatch `{tag}` is not an ETag")))?;
                        if current.as_ref().map(|c| c.version_id) != Some(expected) {
                            return Err(FhirError::new(
                                412,
                                IssueCode::Conflict,
                                format!("Bundle.entry[{i}]: ifMatch {tag} is not the current version"),
                            ));
                        }
                    }
                    let version = current.as_ref().map_or(0, |c| c.version_id) + 1;
                    let created = current.as_ref().is_none_or(|c| c.deleted);
                    resource::stamp(&mut r, &id, version, &now);
                    events.push(Self::written_event(ctx, &t, &id, version, &r, current.is_none()));
                    let v = Versioned { resource: r, id: id.clone(), version_id: version, last_updated: now.clone() };
                    responses.push(response_entry(
                        if created { "201 Created" } else { "200 OK" },
                        Some(v),
                        &t,
                        &base,
                        ret,
                    ));
                }
                Method::Delete => {
                    let current =
                        self.store.current(&t, &id).await.map_err(|err| FhirError::unavailable(err.to_string()))?;
                    if current.as_ref().is_some_and(|c| !permit.admits_version(c)) {
                        return Err(FhirError::concealed(&t, &id).at_entry(i));
                    }
                    if let Some(c) = current.filter(|c| !c.deleted) {
                        let mut ev = Event::new(ResourceDeleted {
                            resource_type: t.clone(),
                            id: id.clone(),
                            version_id: c.version_id + 1,
                            provenance: ctx.provenance.clone(),
                        })
                        .with_actor(ctx.actor.clone())
                        .with_request_id(ctx.request_id.clone());
                        if let Some(p) = c.patient {
                            ev = ev.with_patient(p);
                        }
                        events.push(ev);
                    }
                    responses.push(json!({"response": {"status": "204 No Content"}}));
                }
                Method::Get => unreachable!("refused in pass 1"),
            }
        }
        if !events.is_empty() {
            let records: Vec<NewRecord> =
                events.iter().map(|e| NewRecord::new(e.topic(), e.partition_key(), e.canonical_bytes())).collect();
            self.log.append_batch(records).await.map_err(|err| {
                tracing::error!(error = %err, "transaction append refused: failing closed");
                crate::append_failed(&err)
            })?;
        }
        Ok(json!({"resourceType": "Bundle", "type": "transaction-response", "entry": responses}))
    }

    async fn batch(&self, ctx: &RequestContext, entries: Vec<Entry>, ret: ReturnPreference) -> FhirResult<Value> {
        let base = self.settings.base_url.clone();
        let mut responses: Vec<Option<Value>> = vec![None; entries.len()];
        // Plain creates go out together in one durable append.
        let now = Timestamp::now().to_rfc3339();
        let mut group: Vec<(usize, String, Versioned, Event)> = Vec::new();
        for (i, mut e) in entries.into_iter().enumerate() {
            let (t, id, query) = split_url(&e.url);
            let result: FhirResult<Value> = match (&e.method, id, query) {
                (Method::Post, None, None) if e.if_none_exist.is_none() => {
                    // Moved, not cloned: the entry is not needed again.
                    let r = e.resource.take().expect("checked in parse_entries");
                    let new_id = new_resource_id();
                    let checked = self
                        .check_writable()
                        .and_then(|()| Self::check_type(&t))
                        .and_then(|()| resource::validate(&r, &t).map_err(FhirError::invalid))
                        .and_then(|()| ctx.access.permit(Permission::Create, &t))
                        .and_then(|permit| {
                            if permit.admits(&t, index::patient_of(&t, &new_id, &r).as_deref(), Some(&r)) {
                                Ok(())
                            } else {
                                Err(FhirError::outside_compartment("the resource"))
                            }
                        });
                    let checked = match checked {
                        Err(err) => self.audited(ctx, "create", Some(&t), None, Err(err)).await,
                        ok => ok,
                    };
                    match checked {
                        Ok(()) => {
                            let mut r = r;
                            resource::stamp(&mut r, &new_id, 1, &now);
                            let event = Self::written_event(ctx, &t, &new_id, 1, &r, true);
                            group.push((
                                i,
                                t,
                                Versioned { resource: r, id: new_id, version_id: 1, last_updated: now.clone() },
                                event,
                            ));
                            continue;
                        }
                        Err(err) => Err(err),
                    }
                }
                (Method::Post, None, None) => {
                    let body = serde_json::to_vec(e.resource.as_ref().expect("checked")).expect("json");
                    self.create(ctx, &t, &body, e.if_none_exist.as_deref())
                        .await
                        .map(|o| write_entry(o, &t, &base, ret))
                }
                (Method::Put, Some(id), None) => {
                    let body = serde_json::to_vec(e.resource.as_ref().expect("checked")).expect("json");
                    self.update(ctx, &t, &id, &body, e.if_match.as_deref())
                        .await
                        .map(|o| write_entry(o, &t, &base, ret))
                }
                (Method::Delete, Some(id), None) => {
                    self.delete(ctx, &t, &id).await.map(|_| json!({"response": {"status": "204 No Content"}}))
                }
                (Method::Get, Some(id), None) => self
                    .read(ctx, &t, &id)
                    .await
                    .map(|v| response_entry("200 OK", Some(v), &t, &base, ReturnPreference::Representation)),
                (Method::Get, None, q) => self
                    .search(ctx, &t, q.as_deref().unwrap_or(""), false)
                    .await
                    .map(|b| json!({"resource": b, "response": {"status": "200 OK"}})),
                _ => {
                    let err = entry_error(i, format!("request.url `{}` does not fit the method", e.url));
                    self.audited(ctx, "batch", None, None, Err(err)).await
                }
            };
            responses[i] = Some(result.unwrap_or_else(|err| error_entry(&err)));
        }
        if !group.is_empty() {
            let records: Vec<NewRecord> = group
                .iter()
                .map(|(_, _, _, e)| NewRecord::new(e.topic(), e.partition_key(), e.canonical_bytes()))
                .collect();
            match self.log.append_batch(records).await {
                Ok(_) => {
                    for (i, t, v, _) in group {
                        responses[i] = Some(response_entry("201 Created", Some(v), &t, &base, ret));
                    }
                }
                Err(err) => {
                    tracing::error!(error = %err, "batch append refused: failing closed");
                    let e = crate::append_failed(&err);
                    for (i, ..) in &group {
                        responses[*i] = Some(error_entry(&e));
                    }
                }
            }
        }
        Ok(
            json!({"resourceType": "Bundle", "type": "batch-response", "entry": responses.into_iter().map(|r| r.expect("every entry answered")).collect::<Vec<_>>()}),
        )
    }
}

fn write_entry(outcome: WriteOutcome, resource_type: &str, base: &str, ret: ReturnPreference) -> Value {
    let status = if outcome.created() { "201 Created" } else { "200 OK" };
    response_entry(status, Some(outcome.into_versioned()), resource_type, base, ret)
}
