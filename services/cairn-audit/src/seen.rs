//! "What exactly did this user see" (`cairn investigate seen`): for each read or search a user (or a
//! client acting for itself) made in a window, the resource versions that left the server, with their
//! content reproduced from the log: the access events name the versions returned, the write events
//! carry each version whole, and audit records are rendered again from their events.
//!
//! Two passes over the log: [`SeenBuilder::add_access`] over the access events finds what was
//! returned, then [`SeenBuilder::add_source`] over every event finds the versions' content.

use crate::{audit_events, provenance};
use cairn_events::{Event, Payload, Timestamp, VersionedRef};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Whose accesses: a Cairn user id (the token's subject), or a client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    User(String),
    Client(String),
}

/// One access and what it returned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeenAccess {
    pub recorded: String,
    /// `read`, `vread`, `search-type`, `history-instance`, ...
    pub interaction: String,
    /// `Type/id` for a read, the query for a search.
    pub request: String,
    pub status: u16,
    pub client: String,
    pub request_id: String,
    /// Where the access event is in the log: `topic:partition:offset`.
    pub position: String,
    pub returned: Vec<SeenVersion>,
}

/// A version that left the server, with its content as it was.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeenVersion {
    /// `Type/id/_history/n`
    pub reference: String,
    /// The version as the access event named it (with its patient), for recording who was sent what.
    #[serde(skip)]
    pub version: VersionedRef,
    /// The resource as written (or, for an audit record, as rendered from its event); absent when the
    /// log no longer holds the version (which verification would report).
    pub resource: Option<Value>,
}

fn reference(r: &VersionedRef) -> String {
    format!("{}/{}/_history/{}", r.resource_type, r.id, r.version_id)
}

pub struct SeenBuilder {
    viewer: Viewer,
    from: i64,
    to: i64,
    accesses: Vec<(i64, SeenAccess)>,
    wanted: BTreeSet<String>,
    found: BTreeMap<String, Value>,
}

impl SeenBuilder {
    /// Accesses recorded in `[from, to]`.
    pub fn new(viewer: Viewer, from: Timestamp, to: Timestamp) -> SeenBuilder {
        SeenBuilder {
            viewer,
            from: from.as_millis(),
            to: to.as_millis(),
            accesses: Vec::new(),
            wanted: BTreeSet::new(),
            found: BTreeMap::new(),
        }
    }

    /// First pass: keeps the viewer's reads and searches that returned something.
    pub fn add_access(&mut self, event: &Event, position: String) {
        let at = event.occurred_at.as_millis();
        let mine = match &self.viewer {
            Viewer::User(u) => event.actor.subject.as_deref() == Some(u.as_str()),
            Viewer::Client(c) => event.actor.client_id.as_deref() == Some(c.as_str()),
        };
        if !mine || at < self.from || at > self.to {
            return;
        }
        let (interaction, request, status, returned) = match &event.payload {
            Payload::AccessRead(r) => {
                (r.interaction.clone(), format!("{}/{}", r.resource_type, r.id), r.status, &r.returned)
            }
            Payload::AccessSearch(s) => {
                let request = match &s.resource_type {
                    Some(t) => format!("{t}?{}", s.query),
                    None => format!("?{}", s.query),
                };
                (s.interaction.clone(), request, s.status, &s.returned)
            }
            _ => return,
        };
        if returned.is_empty() {
            return;
        }
        self.wanted.extend(returned.iter().map(reference));
        let access = SeenAccess {
            recorded: event.occurred_at.to_rfc3339(),
            interaction,
            request,
            status,
            client: event.actor.client_id.clone().unwrap_or_default(),
            request_id: event.request_id.clone().unwrap_or_default(),
            position,
            returned: returned
                .iter()
                .map(|v| SeenVersion { reference: reference(v), version: v.clone(), resource: None })
                .collect(),
        };
        self.accesses.push((at, access));
    }

    /// Whether the first pass found anything to look up.
    pub fn wants_anything(&self) -> bool {
        !self.wanted.is_empty()
    }

    /// Second pass: takes the content of the wanted versions from any event that holds or makes them.
    pub fn add_source(&mut self, event: &Event) {
        let written = match &event.payload {
            Payload::ResourceCreated(w) | Payload::ResourceUpdated(w) => Some(w),
            _ => None,
        };
        if let Some(w) = written {
            let key = format!("{}/{}/_history/{}", w.resource_type, w.id, w.version_id);
            if self.wanted.contains(&key)
                && let Ok(resource) = serde_json::from_str::<Value>(w.resource.get())
            {
                self.found.insert(key, resource);
            }
        }
        // Audit records (an auditor's reads of the trail) are rendered from their events again.
        for r in audit_events(event).into_iter().chain(provenance(event)) {
            let key = format!("{}/{}/_history/1", r.resource_type, r.id);
            if self.wanted.contains(&key) {
                self.found.insert(key, r.resource);
            }
        }
    }

    /// The accesses, oldest first, each with the content of what it returned.
    pub fn finish(mut self) -> Vec<SeenAccess> {
        self.accesses.sort_by(|a, b| (a.0, &a.1.position).cmp(&(b.0, &b.1.position)));
        let found = self.found;
        self.accesses
            .into_iter()
            .map(|(_, mut a)| {
                for v in &mut a.returned {
                    v.resource = found.get(&v.reference).cloned();
                }
                a
            })
            .collect()
    }
}

/// RFC 4180, one row per version returned, with a header row (formulas neutralised, `crate::csv`).
pub fn to_csv(accesses: &[SeenAccess]) -> String {
    let mut out = crate::csv::line(&[
        "recorded",
        "interaction",
        "request",
        "status",
        "client",
        "request_id",
        "version",
        "resource",
    ]);
    for a in accesses {
        for v in &a.returned {
            let resource = v.resource.as_ref().map(Value::to_string).unwrap_or_default();
            let status = a.status.to_string();
            out += &crate::csv::line(&[
                &a.recorded,
                &a.interaction,
                &a.request,
                &status,
                &a.client,
                &a.request_id,
                &v.reference,
                &resource,
            ]);
        }
    }
    out
}
