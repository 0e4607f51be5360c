//! FHIR R4 search for the resources Cairn holds (Observation, Patient, Device, and the audit trail's
//! AuditEvent and Provenance): parsing a query
//! string into a [`SearchQuery`] and deciding whether a resource matches it.
//!
//! Everything here is a pure function over `serde_json::Value` so that the HTTP layer, the read
//! models and the tests all agree on one definition of "matches": a store may pre-filter with an
//! index, but the final word on a match always comes from [`matches`], which keeps index bugs from
//! silently changing search results.
//!
//! The submodules split it by concern: `date` (ranges by precision and the prefix rules),
//! `number` (decimal precision for quantities), `query` (query-string parsing and the canonical
//! form used in links), `text` (accent folding for string search) and `matching`.

mod date;
mod matching;
mod number;
mod query;
mod text;

use chrono::{DateTime, FixedOffset, Utc};

pub use date::date_range;
pub use matching::{
    matches, matches_at, matches_param, matches_param_at, observation_effective, observation_patient, sort_value,
};
pub use query::parse_query;

/// `_count` when the client gives none: large enough for typical glucose dashboards, small enough
/// to keep a page cheap.
pub const DEFAULT_COUNT: usize = 50;
/// Upper bound on `_count`; larger requests are clamped (not refused) because the FHIR spec lets a
/// server return fewer entries than asked for, and refusing would break naive clients.
pub const MAX_COUNT: usize = 1000;

/// The resource types this module can search; any other type is refused by [`parse_query`] rather
/// than silently matching nothing.
pub const SEARCHABLE_TYPES: [&str; 5] = ["Observation", "Patient", "Device", "AuditEvent", "Provenance"];

/// The FHIR search parameter types Cairn implements (a subset of R4's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKind {
    Token,
    Reference,
    Date,
    Quantity,
    String,
    Uri,
}

impl ParamKind {
    /// The FHIR `SearchParamType` code, for the CapabilityStatement.
    pub fn as_str(self) -> &'static str {
        match self {
            ParamKind::Token => "token",
            ParamKind::Reference => "reference",
            ParamKind::Date => "date",
            ParamKind::Quantity => "quantity",
            ParamKind::String => "string",
            ParamKind::Uri => "uri",
        }
    }

    /// Modifiers accepted for this kind (without the colon). Kept per kind, not per parameter,
    /// because every modifier Cairn supports is defined by the FHIR spec at the type level.
    pub fn modifiers(self) -> &'static [&'static str] {
        match self {
            ParamKind::Token => &["not"],
            ParamKind::String => &["exact"],
            ParamKind::Reference | ParamKind::Date | ParamKind::Quantity | ParamKind::Uri => &[],
        }
    }
}

/// One supported search parameter; the tables below are the single source of truth shared by the
/// parser, the matcher and (through [`search_params`]) the CapabilityStatement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: ParamKind,
}

const fn def(name: &'static str, kind: ParamKind) -> ParamDef {
    ParamDef { name, kind }
}

const OBSERVATION_PARAMS: &[ParamDef] = &[
    def("_id", ParamKind::Token),
    def("_lastUpdated", ParamKind::Date),
    def("patient", ParamKind::Reference),
    def("subject", ParamKind::Reference),
    def("code", ParamKind::Token),
    def("category", ParamKind::Token),
    def("date", ParamKind::Date),
    def("device", ParamKind::Reference),
    def("identifier", ParamKind::Token),
    def("status", ParamKind::Token),
    def("value-quantity", ParamKind::Quantity),
];

const PATIENT_PARAMS: &[ParamDef] = &[
    def("_id", ParamKind::Token),
    def("_lastUpdated", ParamKind::Date),
    def("identifier", ParamKind::Token),
    def("name", ParamKind::String),
    def("family", ParamKind::String),
    def("given", ParamKind::String),
    def("birthdate", ParamKind::Date),
    def("gender", ParamKind::Token),
];

const DEVICE_PARAMS: &[ParamDef] = &[
    def("_id", ParamKind::Token),
    def("_lastUpdated", ParamKind::Date),
    def("identifier", ParamKind::Token),
    def("type", ParamKind::Token),
    def("patient", ParamKind::Reference),
    def("status", ParamKind::Token),
];

/// All 18 R4 AuditEvent search parameters (plus `_id`, `_lastUpdated`).
const AUDIT_EVENT_PARAMS: &[ParamDef] = &[
    def("_id", ParamKind::Token),
    def("_lastUpdated", ParamKind::Date),
    def("action", ParamKind::Token),
    def("address", ParamKind::String),
    def("agent", ParamKind::Reference),
    def("agent-name", ParamKind::String),
    def("agent-role", ParamKind::Token),
    def("altid", ParamKind::Token),
    def("date", ParamKind::Date),
    def("entity", ParamKind::Reference),
    def("entity-name", ParamKind::String),
    def("entity-role", ParamKind::Token),
    def("entity-type", ParamKind::Token),
    def("outcome", ParamKind::Token),
    def("patient", ParamKind::Reference),
    def("policy", ParamKind::Uri),
    def("site", ParamKind::Token),
    def("source", ParamKind::Reference),
    def("subtype", ParamKind::Token),
    def("type", ParamKind::Token),
];

/// All 10 R4 Provenance search parameters (plus `_id`, `_lastUpdated`).
const PROVENANCE_PARAMS: &[ParamDef] = &[
    def("_id", ParamKind::Token),
    def("_lastUpdated", ParamKind::Date),
    def("agent", ParamKind::Reference),
    def("agent-role", ParamKind::Token),
    def("agent-type", ParamKind::Token),
    def("entity", ParamKind::Reference),
    def("location", ParamKind::Reference),
    def("patient", ParamKind::Reference),
    def("recorded", ParamKind::Date),
    def("signature-type", ParamKind::Token),
    def("target", ParamKind::Reference),
    def("when", ParamKind::Date),
];

/// The search parameters of a resource type (empty for types Cairn cannot search).
pub fn search_params(resource_type: &str) -> &'static [ParamDef] {
    match resource_type {
        "Observation" => OBSERVATION_PARAMS,
        "Patient" => PATIENT_PARAMS,
        "Device" => DEVICE_PARAMS,
        "AuditEvent" => AUDIT_EVENT_PARAMS,
        "Provenance" => PROVENANCE_PARAMS,
        _ => &[],
    }
}

/// The kind of a search parameter of a resource type, or `None` if it is not supported there.
pub fn param_kind(resource_type: &str, name: &str) -> Option<ParamKind> {
    search_params(resource_type).iter().find(|d| d.name == name).map(|d| d.kind)
}

/// A parsed search: AND of params, each an OR of values.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub resource_type: String,
    /// AND-ed: a resource must match every entry. A repeated parameter gives several entries.
    pub params: Vec<SearchParam>,
    /// `_count`: default [`DEFAULT_COUNT`], clamped to [`MAX_COUNT`]; 0 asks for no entries (a
    /// cheap way to get only `total`).
    pub count: usize,
    /// `_offset`: where the page starts; paging links carry it forward.
    pub offset: usize,
    /// `_sort`: only `date` (Observation, AuditEvent) and `_lastUpdated`, because those are the only orders
    /// the stores can produce cheaply.
    pub sort: Vec<SortKey>,
    /// `_summary=count`.
    pub summary_count: bool,
    /// `_total=accurate`; `none` and `estimate` both leave it false since an estimate is what the
    /// server gives anyway.
    pub total_accurate: bool,
    /// `_elements`, in the order given, without duplicates.
    pub elements: Option<Vec<String>>,
    /// `_asOf`: parsed and validated only; applying it is the store's business.
    pub as_of: Option<DateTime<FixedOffset>>,
}

impl SearchQuery {
    /// A query with no parameters and every result parameter at its default.
    pub fn new(resource_type: &str) -> SearchQuery {
        SearchQuery {
            resource_type: resource_type.to_string(),
            params: Vec::new(),
            count: DEFAULT_COUNT,
            offset: 0,
            sort: Vec::new(),
            summary_count: false,
            total_accurate: false,
            elements: None,
            as_of: None,
        }
    }

    /// A canonical, percent-encoded query string (no leading `?`) that [`parse_query`] turns back
    /// into an equal query. Paging links and the Bundle's `self` link are built from it so that
    /// they state what the server actually searched for (dates normalised to UTC, defaults made
    /// explicit) rather than echoing whatever the client typed.
    pub fn to_query_string(&self) -> String {
        query::to_query_string(self)
    }
}

/// One search parameter occurrence; its values are OR-ed.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchParam {
    pub name: String,
    /// Without the colon (`not`, `exact`).
    pub modifier: Option<String>,
    pub values: Vec<SearchValue>,
}

/// One value of a search parameter, already interpreted by the parameter's kind, so that
/// matching never re-parses text and malformed input is rejected up front.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchValue {
    /// `system|code`, `code`, `system|`, `|code`. For `|code` ("a coding without a system") the
    /// system is `Some("")`, which keeps it distinct from `code` ("any system") without adding a
    /// field.
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    /// `Type/id`, `id` or an absolute URL ending in `Type/id`; the base URL is dropped because a
    /// pure function cannot know which base is this server's.
    Reference {
        resource_type: Option<String>,
        id: String,
    },
    Date {
        prefix: Prefix,
        value: DateRange,
    },
    /// `precision_low..precision_high` is the half-open range implied by the number of significant
    /// digits written (`5.4` -> `[5.35, 5.45)`), which is what `eq`/`ne` compare against.
    Quantity {
        prefix: Prefix,
        value: f64,
        precision_low: f64,
        precision_high: f64,
        system: Option<String>,
        code: Option<String>,
    },
    String(String),
    /// A `uri` parameter's value, compared exactly.
    Uri(String),
}

/// FHIR search comparison prefixes (R4 3.1.1.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Prefix {
    #[default]
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl Prefix {
    pub const ALL: [Prefix; 9] =
        [Prefix::Eq, Prefix::Ne, Prefix::Gt, Prefix::Lt, Prefix::Ge, Prefix::Le, Prefix::Sa, Prefix::Eb, Prefix::Ap];

    pub fn as_str(self) -> &'static str {
        match self {
            Prefix::Eq => "eq",
            Prefix::Ne => "ne",
            Prefix::Gt => "gt",
            Prefix::Lt => "lt",
            Prefix::Ge => "ge",
            Prefix::Le => "le",
            Prefix::Sa => "sa",
            Prefix::Eb => "eb",
            Prefix::Ap => "ap",
        }
    }

    pub fn from_code(code: &str) -> Option<Prefix> {
        Prefix::ALL.into_iter().find(|p| p.as_str() == code)
    }
}

/// A half-open instant range `[low, high)`. FHIR dates are ranges, not points: `2026-03` means the
/// whole of March, and every comparison in the spec is defined on ranges. Open ends of a Period are
/// represented by `DateTime::<Utc>::MIN_UTC` / `MAX_UTC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DateRange {
    pub low: DateTime<Utc>,
    pub high: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SortKey {
    /// `date` or `_lastUpdated`, without the `-`.
    pub param: String,
    pub descending: bool,
}

/// Why a query was refused. The three variants map to distinct client mistakes so the HTTP layer
/// can word the OperationOutcome precisely (and lenient mode can ignore only the first).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error("unknown search parameter `{name}`")]
    UnknownParameter { name: String },
    #[error("invalid value `{value}` for search parameter `{name}`: {reason}")]
    InvalidValue { name: String, value: String, reason: String },
    #[error("search parameter `{name}` is not supported: {reason}")]
    Unsupported { name: String, reason: String },
}
