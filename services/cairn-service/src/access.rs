//! What the caller may do: SMART scopes turned into a decision per interaction and per resource.
//!
//! A scope grants a permission (`c r u d s`) on a type. A `patient/` scope confines it to the
//! compartment of the token's patient; a scope with a query (`?category=...`) to resources that match
//! the query. A token may hold several scopes that grant the same permission: a resource is admitted
//! if any of them admits it. Outside what a token admits, reads answer 404 exactly as for a resource
//! that does not exist (nothing about its existence leaks) while the audit trail records 403.

use crate::{FhirError, FhirResult};
use cairn_auth::scope::{Context, Permission, ScopeSet};
use cairn_fhir::outcome::IssueCode;
use cairn_fhir::search::{self, SearchQuery};
use cairn_store::ResourceVersion;
use serde_json::Value;

/// The caller's authority, carried by [`crate::RequestContext`].
#[derive(Debug, Clone)]
pub enum Access {
    /// No checks: `--insecure-no-auth` for local development, and internal callers.
    Unrestricted,
    /// A verified SMART access token.
    Smart {
        scopes: ScopeSet,
        /// The patient in context (`patient` claim), a FHIR id.
        patient: Option<String>,
    },
}

/// One way a resource can be admitted: inside a compartment (if any) and matching a query (if any).
#[derive(Debug, Clone)]
struct Rule {
    compartment: Option<String>,
    query: Option<SearchQuery>,
}

/// The decision for one permission on one type: the resources it admits (any rule admits; no rules
/// at all means everything is admitted).
#[derive(Debug, Clone)]
pub struct Permit {
    rules: Vec<Rule>,
}

impl Permit {
    pub fn all() -> Permit {
        Permit { rules: Vec::new() }
    }

    /// Whether a resource (its type, its patient compartment, its content) is admitted.
    pub fn admits(&self, resource_type: &str, patient: Option<&str>, resource: Option<&Value>) -> bool {
        self.is_unrestricted()
            || self.rules.iter().any(|r| {
                r.compartment.as_deref().is_none_or(|c| patient == Some(c))
                    && r.query.as_ref().is_none_or(|q| {
                        resource.is_some_and(|v| q.resource_type == resource_type && search::matches(v, q))
                    })
            })
    }

    pub fn admits_version(&self, v: &ResourceVersion) -> bool {
        if self.is_unrestricted() {
            return true;
        }
        let needs_content = self.rules.iter().any(|r| r.query.is_some());
        let value = if needs_content { v.resource_value() } else { None };
        self.admits(&v.resource_type, v.patient.as_deref(), value.as_ref())
    }

    /// The one compartment every rule confines to, if they all do (a search can then use the
    /// patient index instead of filtering everything).
    pub fn sole_compartment(&self) -> Option<&str> {
        let first = self.rules.first()?.compartment.as_deref()?;
        self.rules.iter().all(|r| r.compartment.as_deref() == Some(first)).then_some(first)
    }

    pub fn is_unrestricted(&self) -> bool {
        self.rules.is_empty()
    }
}

impl Access {
    /// The permit for `permission` on `resource_type`, or 403 if no scope grants it.
    pub fn permit(&self, permission: Permission, resource_type: &str) -> FhirResult<Permit> {
        let (scopes, patient) = match self {
            Access::Unrestricted => return Ok(Permit::all()),
            Access::Smart { scopes, patient } => (scopes, patient),
        };
        let mut rules = Vec::new();
        let audit_type = cairn_fhir::resource::is_read_only_type(resource_type);
        for scope in scopes.granting(permission, resource_type) {
            // The audit trail is granted by name (`user/AuditEvent.rs`), not by a wildcard an app
            // asked for to read clinical data; within a patient's own compartment a wildcard will do.
            if audit_type && scope.resource_type.is_none() && scope.context != Context::Patient {
                continue;
            }
            let compartment = match scope.context {
                Context::Patient => match patient {
                    Some(p) => Some(format!("Patient/{p}")),
                    None => continue, // a patient scope without a patient in context grants nothing
                },
                Context::User | Context::System => None,
            };
            let query = match &scope.query {
                None => None,
                Some(q) => match search::parse_query(resource_type, q, false) {
                    Ok((parsed, _)) => Some(parsed),
                    Err(_) => continue, // a constraint we cannot evaluate grants nothing
                },
            };
            if compartment.is_none() && query.is_none() {
                return Ok(Permit::all());
            }
            rules.push(Rule { compartment, query });
        }
        if rules.is_empty() {
            return Err(FhirError::new(
                403,
                IssueCode::Forbidden,
                format!("insufficient_scope: the token does not allow `{}` on {resource_type}", permission.letter()),
            ));
        }
        Ok(Permit { rules })
    }
}

impl FhirError {
    /// 404 to the client, 403 in the audit trail: the resource exists (or may) but is outside what
    /// the token admits, and saying so would reveal that it exists.
    pub(crate) fn concealed(resource_type: &str, id: &str) -> FhirError {
        let mut e = FhirError::new(404, IssueCode::NotFound, format!("{resource_type}/{id} does not exist"));
        e.concealed = true;
        e
    }

    /// Refused because of the caller's token, not the resource.
    pub(crate) fn outside_compartment(what: &str) -> FhirError {
        FhirError::new(
            403,
            IssueCode::Forbidden,
            format!("insufficient_scope: {what} is outside what the token allows"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smart(scopes: &str, patient: Option<&str>) -> Access {
        Access::Smart { scopes: ScopeSet::parse(scopes).unwrap(), patient: patient.map(str::to_owned) }
    }

    #[test]
    fn patient_scopes_confine_to_the_compartment() {
        let a = smart("patient/Observation.rs", Some("p1"));
        let p = a.permit(Permission::Read, "Observation").unwrap();
        assert!(p.admits("Observation", Some("Patient/p1"), None));
        assert!(!p.admits("Observation", Some("Patient/p2"), None));
        assert!(!p.admits("Observation", None, None));
        assert_eq!(p.sole_compartment(), Some("Patient/p1"));
        assert_eq!(a.permit(Permission::Create, "Observation").unwrap_err().status, 403);
        // Without a patient in context a patient scope grants nothing.
        assert_eq!(
            smart("patient/Observation.rs", None).permit(Permission::Read, "Observation").unwrap_err().status,
            403
        );
    }

    #[test]
    fn user_and_system_scopes_are_not_confined_and_win_over_patient_scopes() {
        let a = smart("patient/Observation.rs user/Observation.r", Some("p1"));
        assert!(a.permit(Permission::Read, "Observation").unwrap().is_unrestricted());
        let s = a.permit(Permission::Search, "Observation").unwrap();
        assert!(!s.is_unrestricted());
        assert!(smart("system/*.cruds", None).permit(Permission::Delete, "Device").unwrap().is_unrestricted());
    }

    #[test]
    fn query_constrained_scopes_admit_matching_resources_only() {
        let a = smart(
            "user/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
            None,
        );
        let p = a.permit(Permission::Read, "Observation").unwrap();
        let vital = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}]});
        let lab = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}]});
        assert!(p.admits("Observation", None, Some(&vital)));
        assert!(!p.admits("Observation", None, Some(&lab)));
        assert!(!p.admits("Observation", None, None), "without the content a constrained scope admits nothing");
    }
}
