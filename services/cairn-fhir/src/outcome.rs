//! OperationOutcome: how every FHIR error is explained to the client.

use serde_json::{Value, json};

/// The subset of the `issue-type` value set we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    Invalid,
    Structure,
    Required,
    Value,
    NotSupported,
    NotFound,
    Deleted,
    Conflict,
    TooLong,
    Security,
    Forbidden,
    Transient,
    Exception,
    Processing,
    Duplicate,
    Informational,
    /// The request would cost more than the server allows (FHIR `too-costly`).
    TooCostly,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::NotSupported => "not-supported",
            IssueCode::NotFound => "not-found",
            IssueCode::Deleted => "deleted",
            IssueCode::Conflict => "conflict",
            IssueCode::TooLong => "too-long",
            IssueCode::Security => "security",
            IssueCode::Forbidden => "forbidden",
            IssueCode::Transient => "transient",
            IssueCode::Exception => "exception",
            IssueCode::Processing => "processing",
            IssueCode::Duplicate => "duplicate",
            IssueCode::Informational => "informational",
            IssueCode::TooCostly => "too-costly",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueCode,
    pub diagnostics: String,
    /// FHIRPath of the offending element, when known.
    pub expression: Option<String>,
}

impl Issue {
    pub fn error(code: IssueCode, diagnostics: impl Into<String>) -> Issue {
        Issue { severity: Severity::Error, code, diagnostics: diagnostics.into(), expression: None }
    }

    pub fn information(diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Information,
            code: IssueCode::Informational,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Issue {
        self.expression = Some(expression.into());
        self
    }
}

/// The OperationOutcome resource for a list of issues.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    let issues: Vec<Value> = issues
        .iter()
        .map(|i| {
            let mut v = json!({
                "severity": match i.severity {
                    Severity::Fatal => "fatal",
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                    Severity::Information => "information",
                },
                "code": i.code.as_str(),
                "diagnostics": i.diagnostics,
            });
            if let Some(e) = &i.expression {
                v["expression"] = json!([e]);
            }
            v
        })
        .collect();
    json!({"resourceType": "OperationOutcome", "issue": issues})
}
