//! Investigation timelines (`cairn investigate timeline`): every event that touches one patient in a
//! window, in order, with who acted, through which app and token, what was written (the version
//! before and after) or returned, and the token grants and sign-ins behind those accesses.
//!
//! Built from the same records as the trail ([`crate::audit_events`], [`crate::provenance`]), so the
//! timeline and the AuditEvents never disagree. Feed every event of the log (any topic, any order)
//! to [`TimelineBuilder::add`]; [`TimelineBuilder::finish`] orders the entries.

use crate::summary::{Summary, summarize};
use crate::{audit_events, export::records_about};
use cairn_events::{Event, Payload, Timestamp};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// One line of a timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineEntry {
    /// `access` (a FHIR interaction on the patient's data, refusals included), `token` (the grant of
    /// a token used in one), `login` (the user's sign-in before that grant).
    pub kind: &'static str,
    #[serde(flatten)]
    pub summary: Summary,
    /// For a write: the version written (`Type/id/_history/n`) and the one it replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_before: Option<String>,
    /// Where the event is in the log: `topic:partition:offset`.
    pub position: String,
}

/// The longest an access token lives (`--access-token-lifetime-secs` allows up to an hour).
const MAX_ACCESS_TOKEN_LIFETIME_MS: i64 = 3_600_000;

/// Collects a patient's timeline from events fed in any order.
pub struct TimelineBuilder {
    patient: String,
    from: Timestamp,
    to: Timestamp,
    entries: Vec<(i64, String, TimelineEntry)>,
    /// Token grants by `jti`, and sign-ins by user id (all of them: which are needed is known at the end).
    grants: BTreeMap<String, (i64, TimelineEntry)>,
    logins: BTreeMap<String, Vec<(i64, TimelineEntry)>>,
}

impl TimelineBuilder {
    /// `patient` is `Patient/<id>`; entries are those recorded in `[from, to]`.
    pub fn new(patient: &str, from: Timestamp, to: Timestamp) -> TimelineBuilder {
        TimelineBuilder {
            patient: patient.to_owned(),
            from,
            to,
            entries: Vec::new(),
            grants: BTreeMap::new(),
            logins: BTreeMap::new(),
        }
    }

    /// Takes one event at `position` (`topic:partition:offset`).
    pub fn add(&mut self, event: &Event, position: String) {
        let kind = match &event.payload {
            Payload::TokenIssued(_) => "token",
            Payload::LoginSucceeded(_) | Payload::LoginFailed(_) | Payload::Logout(_) => "login",
            _ => "access",
        };
        let about = records_about(event, &self.patient, self.from, self.to);
        let provenance = about.iter().find(|r| r.resource_type == "Provenance").map(|r| &r.resource);
        let after = provenance.and_then(|p| p["target"][0]["reference"].as_str().map(str::to_owned));
        let before = provenance.and_then(|p| {
            p["entity"].as_array()?.iter().find(|e| e["role"] == "revision")?["what"]["reference"]
                .as_str()
                .map(str::to_owned)
        });
        for r in about.iter().filter(|r| r.resource_type == "AuditEvent") {
            let entry = TimelineEntry {
                kind,
                summary: summarize(&r.resource),
                version_after: after.clone(),
                version_before: before.clone(),
                position: position.clone(),
            };
            self.entries.push((r.recorded_ms, position.clone(), entry));
        }
        if kind == "access" {
            return;
        }
        // Grants and sign-ins (about the patient or not, a token's patient context being optional) are
        // kept in case an access of the patient's used them.
        for r in audit_events(event) {
            let summary = summarize(&r.resource);
            let entry = |kind| TimelineEntry {
                kind,
                summary: summary.clone(),
                version_after: None,
                version_before: None,
                position: position.clone(),
            };
            // Only what could be behind an access in the window: a grant of a token that was still
            // alive in it (access tokens live at most an hour), a sign-in before its end. The rest of
            // the log's history is not kept in memory.
            let (from, to) = (self.from.as_millis(), self.to.as_millis());
            if summary.interaction == "ITI-71" && !summary.jti.is_empty() && summary.outcome == "success" {
                if r.recorded_ms >= from - MAX_ACCESS_TOKEN_LIFETIME_MS && r.recorded_ms <= to {
                    self.grants.insert(summary.jti.clone(), (r.recorded_ms, entry("token")));
                }
            } else if summary.interaction == "110122"
                && summary.outcome == "success"
                && !summary.user.is_empty()
                && r.recorded_ms <= to
            {
                self.logins.entry(summary.user.clone()).or_default().push((r.recorded_ms, entry("login")));
            }
        }
    }

    /// The timeline, oldest first: the accesses, each token grant they used, and for each grant to a
    /// user that user's latest sign-in before it (also when those fall before the window).
    pub fn finish(mut self) -> Vec<TimelineEntry> {
        let used: BTreeSet<String> =
            self.entries.iter().map(|(_, _, e)| e.summary.jti.clone()).filter(|j| !j.is_empty()).collect();
        // Positions already on the timeline (a grant or sign-in about the patient itself).
        let mut present: BTreeSet<String> = self.entries.iter().map(|(_, p, _)| p.clone()).collect();
        let mut extra = Vec::new();
        for jti in &used {
            let Some((at, grant)) = self.grants.remove(jti) else { continue };
            let login = self
                .logins
                .get(&grant.summary.user)
                .and_then(|ls| ls.iter().filter(|(t, _)| *t <= at).max_by_key(|(t, _)| *t).cloned());
            for (t, entry) in login.into_iter().chain([(at, grant)]) {
                if present.insert(entry.position.clone()) {
                    extra.push((t, entry.position.clone(), entry));
                }
            }
        }
        self.entries.extend(extra);
        self.entries.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        self.entries.into_iter().map(|(_, _, e)| e).collect()
    }
}

/// The columns of a timeline table (CSV, the HTML page), in order.
pub const COLUMNS: [&str; 16] = [
    "recorded",
    "kind",
    "interaction",
    "action",
    "outcome",
    "user",
    "fhir_user",
    "client",
    "address",
    "jti",
    "patient",
    "resources",
    "version_before",
    "version_after",
    "request_id",
    "position",
];

/// One entry as the table's cells.
pub fn row(e: &TimelineEntry) -> [String; 16] {
    let s = &e.summary;
    [
        s.recorded.clone(),
        e.kind.to_owned(),
        s.interaction.clone(),
        s.action.clone(),
        s.outcome.clone(),
        s.user.clone(),
        s.fhir_user.clone(),
        s.client.clone(),
        s.address.clone(),
        s.jti.clone(),
        s.patient.clone(),
        s.resources.clone(),
        e.version_before.clone().unwrap_or_default(),
        e.version_after.clone().unwrap_or_default(),
        s.request_id.clone(),
        e.position.clone(),
    ]
}

/// RFC 4180, with a header row (formulas neutralised, `crate::csv`).
pub fn to_csv(entries: &[TimelineEntry]) -> String {
    let mut out = crate::csv::line(&COLUMNS);
    for e in entries {
        out += &crate::csv::line(&row(e));
    }
    out
}
