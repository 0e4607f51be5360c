//! The investigation operations: `Patient/{id}/$timeline` (everything that touched a patient in a
//! window, with the sign-ins and grants behind the accesses) and `$seen` (what a user or client was
//! sent). Both read the whole log (`cairn_audit::scan`, the same code as `cairn investigate`), so
//! they cost a pass over it; both need the token's permission to search AuditEvent (a patient-bound
//! token sees its own patient's timeline only) and are recorded like the searches they are.

use crate::{FhirError, FhirResult, FhirService, Permission, RequestContext};
use cairn_audit::seen::{SeenAccess, Viewer};
use cairn_audit::timeline::TimelineEntry;
use cairn_events::{AccessSearch, Timestamp};
use cairn_fhir::outcome::IssueCode;

/// `from` and `to` as instants, in order.
fn window(from: Option<&str>, to: Option<&str>) -> FhirResult<(Timestamp, Timestamp)> {
    let parse = |name: &str, v: Option<&str>| {
        let v = v.ok_or_else(|| {
            FhirError::new(
                400,
                IssueCode::Required,
                format!("`{name}` is required (an instant, e.g. 2026-11-28T09:00:00Z)"),
            )
        })?;
        v.parse::<Timestamp>().map_err(|e| FhirError::new(400, IssueCode::Value, format!("`{name}`: {e}")))
    };
    let (from, to) = (parse("from", from)?, parse("to", to)?);
    if from > to {
        return Err(FhirError::new(400, IssueCode::Value, "`from` is after `to`"));
    }
    Ok((from, to))
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl FhirService {
    /// `GET Patient/{id}/$timeline?from=&to=`: the patient's timeline, oldest first.
    pub async fn timeline(
        &self,
        ctx: &RequestContext,
        patient_id: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> FhirResult<Vec<TimelineEntry>> {
        let patient = format!("Patient/{patient_id}");
        let result = self.timeline_unaudited(ctx, patient_id, &patient, from, to).await;
        let query = format!("$timeline&from={}&to={}", enc(from.unwrap_or("")), enc(to.unwrap_or("")));
        self.record_operation(ctx, Some("Patient"), query, Some(patient), result.as_ref().map(Vec::len)).await?;
        result
    }

    async fn timeline_unaudited(
        &self,
        ctx: &RequestContext,
        patient_id: &str,
        patient: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> FhirResult<Vec<TimelineEntry>> {
        if !cairn_fhir::resource::is_valid_id(patient_id) {
            return Err(FhirError::new(400, IssueCode::Value, format!("`{patient_id}` is not a valid FHIR id")));
        }
        let (from, to) = window(from, to)?;
        let permit = ctx.access.permit(Permission::Search, "AuditEvent")?;
        if !permit.admits("AuditEvent", Some(patient), None) {
            return Err(FhirError::new(
                403,
                IssueCode::Forbidden,
                "the token's AuditEvent access does not cover this patient",
            ));
        }
        let (entries, _) = cairn_audit::scan::timeline(self.log.as_ref(), patient_id, from, to, &mut |_, _| {})
            .await
            .map_err(|e| FhirError::unavailable(e.to_string()))?;
        Ok(entries)
    }

    /// `GET $seen?user=|client=&from=&to=`: each read and search of the user (or client acting for
    /// itself) in the window, with every version it returned, content included.
    pub async fn seen(
        &self,
        ctx: &RequestContext,
        user: Option<&str>,
        client: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
    ) -> FhirResult<Vec<SeenAccess>> {
        let result = self.seen_unaudited(ctx, user, client, from, to).await;
        let who = match (user, client) {
            (Some(u), _) => format!("user={}", enc(u)),
            (None, Some(c)) => format!("client={}", enc(c)),
            (None, None) => String::new(),
        };
        let query = format!("$seen&{who}&from={}&to={}", enc(from.unwrap_or("")), enc(to.unwrap_or("")));
        self.record_operation(ctx, None, query, None, result.as_ref().map(Vec::len)).await?;
        result
    }

    async fn seen_unaudited(
        &self,
        ctx: &RequestContext,
        user: Option<&str>,
        client: Option<&str>,
        from: Option<&str>,
        to: Option<&str>,
    ) -> FhirResult<Vec<SeenAccess>> {
        let viewer = match (user, client) {
            (Some(u), None) if !u.is_empty() => Viewer::User(u.to_owned()),
            (None, Some(c)) if !c.is_empty() => Viewer::Client(c.to_owned()),
            _ => return Err(FhirError::new(400, IssueCode::Required, "give exactly one of `user` and `client`")),
        };
        let (from, to) = window(from, to)?;
        // What someone saw spans patients: only a token that may search every AuditEvent.
        let permit = ctx.access.permit(Permission::Search, "AuditEvent")?;
        if !permit.is_unrestricted() {
            return Err(FhirError::new(403, IssueCode::Forbidden, "$seen needs access to every AuditEvent"));
        }
        cairn_audit::scan::seen(self.log.as_ref(), viewer, from, to, &mut |_, _| {})
            .await
            .map_err(|e| FhirError::unavailable(e.to_string()))
    }

    /// Records an investigation operation (answered or refused) before its answer leaves.
    async fn record_operation(
        &self,
        ctx: &RequestContext,
        resource_type: Option<&str>,
        query: String,
        patient: Option<String>,
        result: Result<usize, &FhirError>,
    ) -> FhirResult<()> {
        let (status, total) = match result {
            Ok(n) => (200, Some(n as u64)),
            Err(e) => (e.audit_status(), None),
        };
        let payload = AccessSearch {
            interaction: "operation".into(),
            resource_type: resource_type.map(str::to_owned),
            query,
            status,
            returned: Vec::new(),
            total,
            view: None,
        };
        self.append_access(ctx, payload.into(), patient).await
    }
}
