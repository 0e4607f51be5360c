//! The investigation operations: `Patient/{id}/$timeline` (everything that touched a patient in a
//! window, with the sign-ins and grants behind the accesses) and `$seen` (what a user or client was
//! sent). Both read the whole log (`cairn_audit::scan`, the same code as `cairn investigate`), so
//! they cost a pass over it: one runs at a time (another is refused with 429, recorded), and an
//! answer past `MAX_ENTRIES` asks for a narrower window. Both need the token's permission to search
//! AuditEvent (a patient-bound token sees its own patient's accesses only, without the staff
//! sign-ins and grants behind them) and are recorded like the searches they are: `$seen` with every
//! version it sent, so each patient whose data it showed gets the record.

use crate::{FhirError, FhirResult, FhirService, Permission, RequestContext};
use cairn_audit::seen::{SeenAccess, Viewer};
use cairn_audit::timeline::TimelineEntry;
use cairn_events::{AccessSearch, Timestamp, VersionedRef};
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

/// The most entries (timeline) or versions (`$seen`) one answer holds.
const MAX_ENTRIES: usize = 250_000;

fn too_many(n: usize) -> FhirError {
    FhirError::new(
        422,
        IssueCode::TooCostly,
        format!(
            "the answer would hold {n} entries (at most {MAX_ENTRIES}): narrow the window, or use `cairn investigate`"
        ),
    )
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
        // An id that is not a FHIR id (the reason it was refused, perhaps) names no compartment.
        let compartment = cairn_fhir::resource::is_valid_id(patient_id).then_some(patient);
        let outcome = result.as_ref().map(|e| (e.len(), Vec::new()));
        self.record_operation(ctx, Some("Patient"), query, compartment, outcome).await?;
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
        self.check_live("$timeline")?;
        let permit = ctx.access.permit(Permission::Search, "AuditEvent")?;
        if !permit.admits("AuditEvent", Some(patient), None) {
            return Err(FhirError::new(
                403,
                IssueCode::Forbidden,
                "the token's AuditEvent access does not cover this patient",
            ));
        }
        let _one = self.investigation_slot()?;
        let (mut entries, _) = cairn_audit::scan::timeline(self.log.as_ref(), patient_id, from, to, &mut |_, _| {})
            .await
            .map_err(|e| FhirError::unavailable(e.to_string()))?;
        if !permit.is_unrestricted() {
            // The sign-ins and grants behind the accesses are about staff and apps, not the
            // patient's compartment: a patient-bound token sees the accesses only.
            entries.retain(|e| e.kind == "access");
        }
        if entries.len() > MAX_ENTRIES {
            return Err(too_many(entries.len()));
        }
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
        // Every version the answer shows is named, with its patient: each patient whose data left
        // the server through this answer gets the record.
        let outcome = result.as_ref().map(|accesses| {
            let sent: Vec<VersionedRef> =
                accesses.iter().flat_map(|a| &a.returned).map(|v| v.version.clone()).collect();
            (accesses.len(), sent)
        });
        self.record_operation(ctx, None, query, None, outcome).await?;
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
        self.check_live("$seen")?;
        // What someone saw spans patients: only a token that may search every AuditEvent.
        let permit = ctx.access.permit(Permission::Search, "AuditEvent")?;
        if !permit.is_unrestricted() {
            return Err(FhirError::new(403, IssueCode::Forbidden, "$seen needs access to every AuditEvent"));
        }
        let _one = self.investigation_slot()?;
        let accesses = cairn_audit::scan::seen(self.log.as_ref(), viewer, from, to, &mut |_, _| {})
            .await
            .map_err(|e| FhirError::unavailable(e.to_string()))?;
        let versions: usize = accesses.iter().map(|a| a.returned.len()).sum();
        if versions > MAX_ENTRIES {
            return Err(too_many(versions));
        }
        Ok(accesses)
    }

    /// The one investigation allowed at a time (each reads the whole log).
    fn investigation_slot(&self) -> FhirResult<tokio::sync::SemaphorePermit<'_>> {
        self.investigations.try_acquire().map_err(|_| {
            FhirError::new(429, IssueCode::Transient, "another investigation is reading the log; try again shortly")
        })
    }

    /// The investigations read the live log: a view of a replay refuses them (they would mix the
    /// replay with what came after its cut).
    fn check_live(&self, operation: &str) -> FhirResult<()> {
        match &self.settings.view {
            Some(view) => Err(FhirError::new(
                405,
                IssueCode::NotSupported,
                format!("{operation} reads the live log: ask the live server (this one shows a {view})"),
            )),
            None => Ok(()),
        }
    }

    /// Records an investigation operation (answered or refused) before its answer leaves.
    async fn record_operation(
        &self,
        ctx: &RequestContext,
        resource_type: Option<&str>,
        query: String,
        patient: Option<String>,
        result: Result<(usize, Vec<VersionedRef>), &FhirError>,
    ) -> FhirResult<()> {
        let (status, total, returned) = match result {
            Ok((n, returned)) => (200, Some(n as u64), returned),
            Err(e) => (e.audit_status(), None, Vec::new()),
        };
        let payload = AccessSearch {
            interaction: "operation".into(),
            resource_type: resource_type.map(str::to_owned),
            query,
            status,
            returned,
            total,
            view: None,
        };
        self.append_access(ctx, payload.into(), patient).await
    }
}
