//! Compliance reports over the audit trail: the questions compliance officers ask, answered from the
//! AuditEvents as rows they can hand on (JSON or CSV, rendered by the edge). Each report is an
//! AuditEvent search underneath, checked against the token like any search and audited like one.

use crate::{FhirError, FhirResult, FhirService, Permission, RequestContext};
use cairn_events::{AccessSearch, VersionedRef};
use cairn_fhir::outcome::IssueCode;
use cairn_fhir::search;
use serde_json::Value;
use std::collections::BTreeMap;

/// Which report, with its subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportKind {
    /// Accounting of access and disclosures: every access to one patient's data.
    PatientAccess { patient: String },
    /// Everything one user (by Cairn user id) did.
    UserActivity { user: String },
    /// Refused sign-ins, counted per username and per source address.
    FailedLogins,
    /// Security alerts: revocations, account and client changes, emergency access.
    SecurityAlerts,
}

impl ReportKind {
    /// From the operation's parameters (`kind`, and `patient` or `user`).
    pub fn parse(kind: &str, patient: Option<&str>, user: Option<&str>) -> FhirResult<ReportKind> {
        let missing = |what: &str| FhirError::new(400, IssueCode::Required, format!("report `{kind}` needs `{what}`"));
        Ok(match kind {
            "patient-access" => {
                let p = patient.ok_or_else(|| missing("patient"))?;
                let id = p.strip_prefix("Patient/").unwrap_or(p);
                if !cairn_fhir::resource::is_valid_id(id) {
                    return Err(FhirError::new(400, IssueCode::Value, format!("`{p}` is not a Patient id")));
                }
                ReportKind::PatientAccess { patient: format!("Patient/{id}") }
            }
            "user-activity" => ReportKind::UserActivity { user: user.ok_or_else(|| missing("user"))?.to_owned() },
            "failed-logins" => ReportKind::FailedLogins,
            "security-alerts" => ReportKind::SecurityAlerts,
            other => {
                return Err(FhirError::new(
                    400,
                    IssueCode::Value,
                    format!(
                        "unknown report `{other}`: patient-access, user-activity, failed-logins or security-alerts"
                    ),
                ));
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            ReportKind::PatientAccess { .. } => "patient-access",
            ReportKind::UserActivity { .. } => "user-activity",
            ReportKind::FailedLogins => "failed-logins",
            ReportKind::SecurityAlerts => "security-alerts",
        }
    }

    /// The AuditEvent search behind the report (without the time window).
    fn query(&self) -> String {
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        match self {
            ReportKind::PatientAccess { patient } => format!("patient={}", enc(patient)),
            ReportKind::UserActivity { user } => format!("altid={}", enc(user)),
            ReportKind::FailedLogins => format!(
                "type={}&subtype={}&outcome=4,8,12",
                enc("http://dicom.nema.org/resources/ontology/DCM|110114"),
                enc("http://dicom.nema.org/resources/ontology/DCM|110122")
            ),
            ReportKind::SecurityAlerts => {
                format!("type={}", enc("http://dicom.nema.org/resources/ontology/DCM|110113"))
            }
        }
    }
}

/// A report as a table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub report: &'static str,
    pub from: String,
    pub to: String,
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Report {
    /// RFC 4180 CSV with a header row, safe to open in a spreadsheet (`cairn_audit::csv`).
    pub fn to_csv(&self) -> String {
        let mut out = cairn_audit::csv::line(&self.columns);
        for row in &self.rows {
            out.push_str(&cairn_audit::csv::line(row));
        }
        out
    }
}

const ACCESS_COLUMNS: [&str; 11] = [
    "recorded",
    "action",
    "interaction",
    "outcome",
    "user",
    "fhir_user",
    "client",
    "address",
    "patient",
    "resources",
    "request_id",
];

fn text(v: &Value) -> String {
    v.as_str().map(str::to_owned).unwrap_or_default()
}

/// One access row: who did what to which resources, when, from where, with what outcome.
fn access_row(a: &Value) -> Vec<String> {
    let s = cairn_audit::summary::summarize(a);
    vec![
        s.recorded,
        s.action,
        s.interaction,
        s.outcome,
        s.user,
        s.fhir_user,
        s.client,
        s.address,
        s.patient,
        s.resources,
        s.request_id,
    ]
}

impl FhirService {
    /// Runs a report over the AuditEvents recorded in `[from, to]` (FHIR dates or instants), oldest
    /// first. Needs the token's permission to search AuditEvent (and within a patient compartment only
    /// sees that patient's records). Audited like the search it is.
    pub async fn audit_report(
        &self,
        ctx: &RequestContext,
        kind: &ReportKind,
        from: &str,
        to: &str,
    ) -> FhirResult<Report> {
        let raw_query = format!(
            "{}&date=ge{}&date=le{}",
            kind.query(),
            form_urlencoded::byte_serialize(from.as_bytes()).collect::<String>(),
            form_urlencoded::byte_serialize(to.as_bytes()).collect::<String>()
        );
        let result = self.report_unaudited(ctx, kind, &raw_query, from, to).await;
        let (status, returned) = match &result {
            Ok((_, refs)) => (200, refs.clone()),
            Err(e) => (e.audit_status(), Vec::new()),
        };
        let payload = AccessSearch {
            interaction: "operation".into(),
            resource_type: Some("AuditEvent".into()),
            query: format!("$report&kind={}&{raw_query}", kind.name()),
            status,
            total: Some(returned.len() as u64),
            returned,
            view: None,
        };
        let patient = match kind {
            ReportKind::PatientAccess { patient } => Some(patient.clone()),
            _ => None,
        };
        self.append_access(ctx, payload.into(), patient).await?;
        result.map(|(report, _)| report)
    }

    async fn report_unaudited(
        &self,
        ctx: &RequestContext,
        kind: &ReportKind,
        raw_query: &str,
        from: &str,
        to: &str,
    ) -> FhirResult<(Report, Vec<VersionedRef>)> {
        let permit = ctx.access.permit(Permission::Search, "AuditEvent")?;
        let (query, _) = search::parse_query("AuditEvent", raw_query, false)
            .map_err(|e| FhirError::new(400, IssueCode::Invalid, e.to_string()))?;
        self.caught_up_for("AuditEvent", None).await?;
        let mut found: Vec<(String, Value, VersionedRef)> = Vec::new();
        self.scan("AuditEvent", &query, &mut |v, r| {
            if permit.is_unrestricted() || permit.admits(&v.resource_type, v.patient.as_deref(), Some(r)) {
                found.push((text(&r["recorded"]), r.clone(), crate::bundle::version_ref(&v)));
            }
            true
        })
        .await?;
        found.sort_by(|a, b| a.0.cmp(&b.0));
        let refs = found.iter().map(|(_, _, v)| v.clone()).collect();
        let (columns, rows) = match kind {
            ReportKind::FailedLogins => {
                // Per username and per source address: how many, first and last.
                let mut counts: BTreeMap<(String, String), (u64, String, String)> = BTreeMap::new();
                for (recorded, a, _) in &found {
                    let agent = a["agent"].as_array().and_then(|g| g.iter().find(|g| g["requestor"] == true)).cloned();
                    let agent = agent.unwrap_or(Value::Null);
                    let user = agent["who"]["identifier"]["value"].as_str().unwrap_or("(none given)").to_owned();
                    let address = agent["network"]["address"].as_str().unwrap_or("(unknown)").to_owned();
                    for key in [("username".to_owned(), user), ("address".to_owned(), address)] {
                        let e = counts.entry(key).or_insert((0, recorded.clone(), recorded.clone()));
                        e.0 += 1;
                        e.2 = recorded.clone();
                    }
                }
                // Most failures first (a stable sort keeps the key order among equals).
                let mut counted: Vec<_> = counts.into_iter().collect();
                counted.sort_by_key(|c| std::cmp::Reverse(c.1.0));
                let rows = counted
                    .into_iter()
                    .map(|((by, who), (n, first, last))| vec![by, who, n.to_string(), first, last])
                    .collect();
                (vec!["by", "value", "failures", "first", "last"], rows)
            }
            ReportKind::SecurityAlerts => (
                vec!["recorded", "alert", "by", "about", "description"],
                found
                    .iter()
                    .map(|(recorded, a, _)| {
                        let by = &a["agent"][0]["who"];
                        let by = by["identifier"]["value"].as_str().or(by["display"].as_str()).unwrap_or_default();
                        let about = &a["entity"][0]["what"]["identifier"];
                        vec![
                            recorded.clone(),
                            text(&a["subtype"][0]["display"]),
                            by.to_owned(),
                            format!("{}|{}", text(&about["system"]), text(&about["value"])),
                            text(&a["entity"][0]["description"]),
                        ]
                    })
                    .collect(),
            ),
            _ => (ACCESS_COLUMNS.to_vec(), found.iter().map(|(_, a, _)| access_row(a)).collect()),
        };
        let report = Report { report: kind.name(), from: from.to_owned(), to: to.to_owned(), columns, rows };
        Ok((report, refs))
    }
}
