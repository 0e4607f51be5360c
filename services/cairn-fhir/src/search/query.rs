//! Query-string parsing into a [`SearchQuery`], and the canonical query string back.
//!
//! Values are interpreted here, once, by the parameter's kind: a malformed date or number is a
//! client error the client should hear about, not a resource that silently fails to match.

use super::date::{self, format_range};
use super::matching::reference_parts;
use super::number::{self, format_decimal};
use super::{
    MAX_COUNT, ParamKind, Prefix, SEARCHABLE_TYPES, SearchError, SearchParam, SearchQuery, SearchValue, SortKey,
    param_kind,
};
use chrono::SecondsFormat;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// Parameters that shape the result rather than select resources; every resource type has them.
const RESULT_PARAMS: [&str; 8] = ["_count", "_offset", "_sort", "_summary", "_total", "_elements", "_asOf", "_format"];

fn invalid(name: &str, value: &str, reason: impl Into<String>) -> SearchError {
    SearchError::InvalidValue { name: name.to_string(), value: value.to_string(), reason: reason.into() }
}

/// `+` means space in `application/x-www-form-urlencoded`, which is what browsers and most HTTP
/// clients produce, so it is honoured before percent-decoding (after which `%2B` is a real `+`).
fn decode(raw: &str) -> Option<String> {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8().ok().map(|s| s.into_owned())
}

/// Splits on `sep` except where escaped with `\`, leaving escapes in place so that a later split
/// on another separator (`,` first, then `|`) still sees them.
fn split_escaped(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            parts.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&s[start..]);
    parts
}

/// Resolves the R4 escapes `\,` `\|` `\$` `\\`; any other backslash is kept literally, since
/// refusing it would break values that merely contain one.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(&next @ (',' | '|' | '$' | '\\')) = chars.peek()
        {
            out.push(next);
            chars.next();
            continue;
        }
        out.push(c);
    }
    out
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, ',' | '|' | '$' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `query` is the raw query string (after `?`, percent-encoded, `+` is a space). With `lenient`,
/// unknown parameters are skipped and their names (as written, modifier included) returned,
/// mirroring `Prefer: handling=lenient`; malformed values and unsupported modifiers are errors
/// either way, because ignoring them would return a broader result than the client asked for.
pub fn parse_query(resource_type: &str, query: &str, lenient: bool) -> Result<(SearchQuery, Vec<String>), SearchError> {
    if !SEARCHABLE_TYPES.contains(&resource_type) {
        return Err(SearchError::Unsupported {
            name: resource_type.to_string(),
            reason: format!("search is only supported for {}", SEARCHABLE_TYPES.join(", ")),
        });
    }
    let mut query_out = SearchQuery::new(resource_type);
    let mut ignored: Vec<String> = Vec::new();
    let mut seen_result_params: Vec<String> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let full_name = decode(raw_name)
            .ok_or_else(|| invalid(raw_name, raw_name, "the parameter name is not percent-encoded UTF-8"))?;
        // Decoded only once the parameter is known: an ignored parameter's value is not ours to judge.
        let decode_value =
            || decode(raw_value).ok_or_else(|| invalid(&full_name, raw_value, "not percent-encoded UTF-8"));
        let (name, modifier) = match full_name.split_once(':') {
            Some((name, modifier)) => (name, Some(modifier)),
            None => (full_name.as_str(), None),
        };

        if RESULT_PARAMS.contains(&name) {
            let value = decode_value()?;
            if modifier.is_some() {
                return Err(SearchError::Unsupported {
                    name: full_name.clone(),
                    reason: format!("`{name}` takes no modifier"),
                });
            }
            // A second `_count` is ambiguous: refusing it beats guessing which one the client meant.
            if name != "_format" && seen_result_params.iter().any(|n| n == name) {
                return Err(invalid(name, &value, "may be given only once"));
            }
            seen_result_params.push(name.to_string());
            apply_result_param(&mut query_out, name, &value)?;
            continue;
        }

        let Some(kind) = param_kind(resource_type, name) else {
            if lenient {
                if !ignored.contains(&full_name) {
                    ignored.push(full_name);
                }
                continue;
            }
            return Err(SearchError::UnknownParameter { name: full_name });
        };
        if let Some(modifier) = modifier
            && !kind.modifiers().contains(&modifier)
        {
            let accepted = match kind.modifiers() {
                [] => format!("`{name}` accepts no modifiers"),
                list => format!(
                    "`{name}` accepts only {}",
                    list.iter().map(|m| format!(":{m}")).collect::<Vec<_>>().join(", ")
                ),
            };
            return Err(SearchError::Unsupported {
                name: full_name.clone(),
                reason: format!("the :{modifier} modifier is not supported; {accepted}"),
            });
        }
        let values = parse_values(name, kind, &decode_value()?)?;
        query_out.params.push(SearchParam { name: name.to_string(), modifier: modifier.map(str::to_string), values });
    }
    Ok((query_out, ignored))
}

fn parse_values(name: &str, kind: ParamKind, value: &str) -> Result<Vec<SearchValue>, SearchError> {
    if value.is_empty() {
        return Err(invalid(name, value, "a value is required"));
    }
    split_escaped(value, ',')
        .into_iter()
        .map(|item| {
            if item.is_empty() {
                return Err(invalid(name, value, "empty value in a comma-separated list"));
            }
            let parsed = match kind {
                ParamKind::Token => parse_token(item),
                ParamKind::Reference => parse_reference(name, item),
                ParamKind::Date => parse_date(item),
                ParamKind::Quantity => parse_quantity(item),
                ParamKind::String => Ok(SearchValue::String(unescape(item))),
                ParamKind::Uri => Ok(SearchValue::Uri(unescape(item))),
            };
            parsed.map_err(|reason| invalid(name, item, reason))
        })
        .collect()
}

fn parse_token(item: &str) -> Result<SearchValue, String> {
    let token = |system: Option<String>, code: Option<String>| Ok(SearchValue::Token { system, code });
    match split_escaped(item, '|').as_slice() {
        [code] => token(None, Some(unescape(code))),
        ["", ""] => Err("`|` alone names neither a system nor a code".into()),
        ["", code] => token(Some(String::new()), Some(unescape(code))),
        [system, ""] => token(Some(unescape(system)), None),
        [system, code] => token(Some(unescape(system)), Some(unescape(code))),
        _ => Err("a token has at most one unescaped `|` (system|code)".into()),
    }
}

fn parse_reference(name: &str, item: &str) -> Result<SearchValue, String> {
    let text = unescape(item);
    let (resource_type, id) =
        reference_parts(&text).ok_or("expected `Type/id`, an id, or an absolute URL ending in `Type/id`")?;
    // `patient` can only ever point at a Patient, so a bare id is made explicit (which lets the
    // canonical query string and index lookups say `Patient/123`) and any other type is a mistake.
    let resource_type = match (name, resource_type) {
        ("patient", None | Some("Patient")) => Some("Patient"),
        ("patient", Some(other)) => return Err(format!("`patient` refers to Patient resources, not {other}")),
        (_, t) => t,
    };
    Ok(SearchValue::Reference { resource_type: resource_type.map(str::to_string), id: id.to_string() })
}

/// Splits off a two-letter prefix. Two leading letters that are not a prefix are refused rather
/// than read as part of the value, so `gr5` is reported as a bad prefix, not as a bad number.
fn split_prefix(item: &str) -> Result<(Prefix, &str), String> {
    let b = item.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1].is_ascii_alphabetic() {
        let code = &item[..2];
        let prefix = Prefix::from_code(code)
            .ok_or_else(|| format!("unknown prefix `{code}`; expected one of eq, ne, gt, lt, ge, le, sa, eb, ap"))?;
        let rest = &item[2..];
        if rest.is_empty() {
            return Err(format!("a value is required after the prefix `{code}`"));
        }
        Ok((prefix, rest))
    } else {
        Ok((Prefix::Eq, item))
    }
}

fn parse_date(item: &str) -> Result<SearchValue, String> {
    let (prefix, rest) = split_prefix(item)?;
    // An unencoded `+02:00` arrives as ` 02:00`; a date never contains a space, so restore it.
    let text = unescape(rest).replace(' ', "+");
    let value = date::date_range(&text).ok_or_else(|| {
        format!(
            "`{text}` is not a valid date; expected YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.fff]][Z|±hh:mm]"
        )
    })?;
    Ok(SearchValue::Date { prefix, value })
}

fn parse_quantity(item: &str) -> Result<SearchValue, String> {
    let (prefix, rest) = split_prefix(item)?;
    let non_empty = |s: &&str| (!s.is_empty()).then(|| unescape(s));
    let (number, system, code) = match split_escaped(rest, '|').as_slice() {
        [number] => (unescape(number), None, None),
        [number, system, code] => (unescape(number), non_empty(system), non_empty(code)),
        _ => return Err("expected `[prefix]number` or `[prefix]number|system|code`".into()),
    };
    // Same repair as for dates: `1e+2` sent unencoded arrives as `1e 2`.
    let d = number::parse_decimal(&number.replace(' ', "+"))?;
    Ok(SearchValue::Quantity { prefix, value: d.value, precision_low: d.low, precision_high: d.high, system, code })
}

fn digits_only(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn apply_result_param(q: &mut SearchQuery, name: &str, value: &str) -> Result<(), SearchError> {
    if value.is_empty() {
        return Err(invalid(name, value, "a value is required"));
    }
    match name {
        "_count" => {
            if !digits_only(value) {
                return Err(invalid(name, value, "must be a non-negative integer"));
            }
            // Only overflow can fail here, and an overflowing count is just a very large one.
            q.count = value.parse::<usize>().map_or(MAX_COUNT, |n| n.min(MAX_COUNT));
        }
        "_offset" => {
            if !digits_only(value) {
                return Err(invalid(name, value, "must be a non-negative integer"));
            }
            q.offset = value.parse().map_err(|_| invalid(name, value, "is too large"))?;
        }
        "_sort" => q.sort = parse_sort(&q.resource_type, value)?,
        "_summary" => match value {
            "count" => q.summary_count = true,
            "true" | "false" | "text" | "data" => {
                return Err(SearchError::Unsupported {
                    name: name.to_string(),
                    reason: format!("`_summary={value}` is not supported; only `_summary=count` is"),
                });
            }
            _ => return Err(invalid(name, value, "expected count")),
        },
        "_total" => match value {
            "accurate" => q.total_accurate = true,
            "none" | "estimate" => q.total_accurate = false,
            _ => return Err(invalid(name, value, "expected none, estimate or accurate")),
        },
        "_elements" => {
            let mut elements: Vec<String> = Vec::new();
            for element in value.split(',').map(str::trim) {
                let well_formed = element.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                    && element.chars().all(|c| c.is_ascii_alphanumeric());
                if !well_formed {
                    return Err(invalid(name, value, format!("`{element}` is not an element name")));
                }
                if !elements.iter().any(|e| e == element) {
                    elements.push(element.to_string());
                }
            }
            q.elements = Some(elements);
        }
        "_asOf" => {
            let text = value.replace(' ', "+");
            q.as_of = Some(date::parse_instant(&text).ok_or_else(|| {
                invalid(name, value, "must be an instant with seconds and a time zone, e.g. 2026-03-04T10:00:00Z")
            })?);
        }
        "_format" => {
            // Unencoded `application/fhir+json` arrives with a space for the `+`.
            let mime = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            if !matches!(mime.as_str(), "json" | "application/json" | "application/fhir+json" | "application/fhir json")
            {
                return Err(SearchError::Unsupported {
                    name: name.to_string(),
                    reason: format!("`{value}`: only JSON is supported"),
                });
            }
        }
        _ => unreachable!("RESULT_PARAMS and apply_result_param list the same names"),
    }
    Ok(())
}

fn parse_sort(resource_type: &str, value: &str) -> Result<Vec<SortKey>, SearchError> {
    let mut keys: Vec<SortKey> = Vec::new();
    for item in value.split(',').map(str::trim) {
        let (param, descending) = match item.strip_prefix('-') {
            Some(param) => (param, true),
            None => (item, false),
        };
        let has_date = matches!(resource_type, "Observation" | "AuditEvent");
        let sortable = param == "_lastUpdated" || (param == "date" && has_date);
        if !sortable {
            let allowed = if has_date { "date and _lastUpdated" } else { "_lastUpdated" };
            let what = if item.is_empty() { "an empty sort key".to_string() } else { format!("`{item}`") };
            return Err(invalid("_sort", value, format!("cannot sort {resource_type} by {what}; only by {allowed}")));
        }
        if keys.iter().any(|k| k.param == param) {
            return Err(invalid("_sort", value, format!("`{param}` appears more than once")));
        }
        keys.push(SortKey { param: param.to_string(), descending });
    }
    Ok(keys)
}

/// Everything but RFC 3986 unreserved characters and the `/` `:` that make references and
/// instants readable is percent-encoded; in particular `+` (else it reads as a space), `,` inside
/// a value (else it splits the value) and `\` `|` `&` `=`.
const QUERY_VALUE: &AsciiSet =
    &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~').remove(b'/').remove(b':');

fn encode(s: &str) -> String {
    utf8_percent_encode(s, QUERY_VALUE).to_string()
}

fn format_value(value: &SearchValue) -> String {
    let prefix = |p: &Prefix| if *p == Prefix::Eq { "" } else { p.as_str() };
    match value {
        SearchValue::Token { system, code } => {
            let code = code.as_deref().map(escape).unwrap_or_default();
            match system.as_deref() {
                None => code,
                Some(system) => format!("{}|{code}", escape(system)),
            }
        }
        SearchValue::Reference { resource_type: Some(t), id } => escape(&format!("{t}/{id}")),
        SearchValue::Reference { resource_type: None, id } => escape(id),
        SearchValue::Date { prefix: p, value } => format!("{}{}", prefix(p), format_range(value)),
        SearchValue::Quantity { prefix: p, value, precision_low, precision_high, system, code } => {
            let number = format_decimal(*value, *precision_low, *precision_high);
            if system.is_none() && code.is_none() {
                format!("{}{number}", prefix(p))
            } else {
                let part = |s: &Option<String>| s.as_deref().map(escape).unwrap_or_default();
                format!("{}{number}|{}|{}", prefix(p), part(system), part(code))
            }
        }
        SearchValue::String(s) | SearchValue::Uri(s) => escape(s),
    }
}

pub(super) fn to_query_string(q: &SearchQuery) -> String {
    let mut parts: Vec<String> = q
        .params
        .iter()
        .map(|p| {
            let name = match &p.modifier {
                Some(m) => format!("{}:{m}", p.name),
                None => p.name.clone(),
            };
            let values: Vec<String> = p.values.iter().map(|v| encode(&format_value(v))).collect();
            format!("{}={}", encode(&name), values.join(","))
        })
        .collect();
    parts.push(format!("_count={}", q.count));
    parts.push(format!("_offset={}", q.offset));
    if !q.sort.is_empty() {
        let keys: Vec<String> =
            q.sort.iter().map(|k| format!("{}{}", if k.descending { "-" } else { "" }, k.param)).collect();
        parts.push(format!("_sort={}", encode(&keys.join(","))));
    }
    if q.summary_count {
        parts.push("_summary=count".to_string());
    }
    if q.total_accurate {
        parts.push("_total=accurate".to_string());
    }
    if let Some(elements) = q.elements.as_ref().filter(|e| !e.is_empty()) {
        parts.push(format!("_elements={}", encode(&elements.join(","))));
    }
    if let Some(as_of) = q.as_of {
        parts.push(format!("_asOf={}", encode(&as_of.to_rfc3339_opts(SecondsFormat::AutoSi, true))));
    }
    parts.join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::{DateRange, date_range};
    use chrono::{DateTime, Utc};

    fn parse(rt: &str, query: &str) -> SearchQuery {
        parse_query(rt, query, false).unwrap_or_else(|e| panic!("{query}: {e}")).0
    }

    fn err(rt: &str, query: &str) -> SearchError {
        match parse_query(rt, query, false) {
            Ok((q, _)) => panic!("{query} should fail, got {q:?}"),
            Err(e) => e,
        }
    }

    fn reason(e: SearchError) -> String {
        match e {
            SearchError::InvalidValue { reason, .. } | SearchError::Unsupported { reason, .. } => reason,
            SearchError::UnknownParameter { name } => panic!("unexpected unknown parameter {name}"),
        }
    }

    fn single(rt: &str, query: &str) -> SearchValue {
        let q = parse(rt, query);
        assert_eq!(q.params.len(), 1, "{query}");
        assert_eq!(q.params[0].values.len(), 1, "{query}");
        q.params[0].values[0].clone()
    }

    fn token(system: Option<&str>, code: Option<&str>) -> SearchValue {
        SearchValue::Token { system: system.map(str::to_string), code: code.map(str::to_string) }
    }

    fn reference(t: Option<&str>, id: &str) -> SearchValue {
        SearchValue::Reference { resource_type: t.map(str::to_string), id: id.to_string() }
    }

    fn dr(text: &str) -> DateRange {
        date_range(text).expect("test date")
    }

    #[test]
    fn defaults() {
        let (q, ignored) = parse_query("Observation", "", false).expect("empty query");
        assert_eq!(q, SearchQuery::new("Observation"));
        assert_eq!((q.count, q.offset, q.summary_count, q.total_accurate), (50, 0, false, false));
        assert!(q.params.is_empty() && q.sort.is_empty() && q.elements.is_none() && q.as_of.is_none());
        assert!(ignored.is_empty());
        // Stray separators are harmless.
        assert_eq!(parse("Observation", "&&code=2339-0&").params.len(), 1);
    }

    #[test]
    fn token_forms() {
        let loinc = "http://loinc.org";
        assert_eq!(single("Observation", "code=http://loinc.org|2339-0"), token(Some(loinc), Some("2339-0")));
        assert_eq!(single("Observation", "code=http%3A%2F%2Floinc.org%7C2339-0"), token(Some(loinc), Some("2339-0")));
        assert_eq!(single("Observation", "code=2339-0"), token(None, Some("2339-0")));
        assert_eq!(single("Observation", "code=http://loinc.org|"), token(Some(loinc), None));
        assert_eq!(single("Observation", "code=|2339-0"), token(Some(""), Some("2339-0")));
        assert_eq!(
            single("Observation", "identifier=urn:oid:1.2.3\\|4|A\\,1"),
            token(Some("urn:oid:1.2.3|4"), Some("A,1"))
        );
        assert_eq!(reason(err("Observation", "code=|")), "`|` alone names neither a system nor a code");
        assert!(reason(err("Observation", "code=a|b|c")).contains("at most one"));
    }

    #[test]
    fn comma_is_or_and_escaped_comma_is_literal() {
        let q = parse("Observation", "code=2339-0,http://loinc.org|15074-8");
        assert_eq!(
            q.params[0].values,
            vec![token(None, Some("2339-0")), token(Some("http://loinc.org"), Some("15074-8"))]
        );
        let q = parse("Patient", "family=Smith\\,Jones,Doe");
        assert_eq!(
            q.params[0].values,
            vec![SearchValue::String("Smith,Jones".into()), SearchValue::String("Doe".into())]
        );
        // A percent-encoded comma is still a separator: decoding happens before splitting.
        assert_eq!(parse("Observation", "status=final%2Camended").params[0].values.len(), 2);
        // A backslash before anything else is kept.
        assert_eq!(single("Patient", "family=a\\b"), SearchValue::String("a\\b".into()));
        let q = parse("Patient", "family=a\\\\,b");
        assert_eq!(q.params[0].values, vec![SearchValue::String("a\\".into()), SearchValue::String("b".into())]);
    }

    #[test]
    fn repeated_parameters_are_anded() {
        let q = parse("Observation", "date=ge2026-01-01&date=lt2026-02-01");
        assert_eq!(q.params.len(), 2);
        assert_eq!(q.params[0].values, vec![SearchValue::Date { prefix: Prefix::Ge, value: dr("2026-01-01") }]);
        assert_eq!(q.params[1].values, vec![SearchValue::Date { prefix: Prefix::Lt, value: dr("2026-02-01") }]);
    }

    #[test]
    fn plus_is_a_space_and_percent_2b_is_a_plus() {
        assert_eq!(single("Patient", "name=Anne+Marie"), SearchValue::String("Anne Marie".into()));
        assert_eq!(single("Patient", "name=Anne%2BMarie"), SearchValue::String("Anne+Marie".into()));
        // Dates repair an unencoded `+` zone.
        let encoded = single("Observation", "date=ge2026-03-04T10:00:00%2B02:00");
        assert_eq!(single("Observation", "date=ge2026-03-04T10:00:00+02:00"), encoded);
        assert_eq!(encoded, SearchValue::Date { prefix: Prefix::Ge, value: dr("2026-03-04T08:00:00Z") });
    }

    #[test]
    fn references() {
        assert_eq!(single("Observation", "subject=Patient/pat-1"), reference(Some("Patient"), "pat-1"));
        assert_eq!(single("Observation", "subject=pat-1"), reference(None, "pat-1"));
        assert_eq!(
            single("Observation", "subject=https://fhir.example.org/fhir/Group/g.1"),
            reference(Some("Group"), "g.1")
        );
        assert_eq!(single("Observation", "subject=Patient/pat-1/_history/3"), reference(Some("Patient"), "pat-1"));
        // `patient` makes a bare id explicit and refuses other types.
        assert_eq!(single("Observation", "patient=pat-1"), reference(Some("Patient"), "pat-1"));
        assert_eq!(single("Device", "patient=http://x.org/Patient/pat-1"), reference(Some("Patient"), "pat-1"));
        assert_eq!(reason(err("Observation", "patient=Group/g1")), "`patient` refers to Patient resources, not Group");
        assert_eq!(single("Observation", "device=Device/cgm-1"), reference(Some("Device"), "cgm-1"));
        for bad in [
            "Patient/",
            "/pat-1",
            "patient/pat-1",
            "Patient/a/b",
            "pat_1",
            "urn:uuid:0c3f",
            "#p1",
            "http://x.org/pat-1",
        ] {
            let e = err("Observation", &format!("subject={}", encode(bad)));
            assert!(matches!(&e, SearchError::InvalidValue { name, .. } if name == "subject"), "{bad}: {e:?}");
        }
        let long = "a".repeat(65);
        assert!(matches!(err("Observation", &format!("subject={long}")), SearchError::InvalidValue { .. }));
    }

    #[test]
    fn date_prefixes() {
        for p in Prefix::ALL {
            let v = single("Observation", &format!("date={}2026-03", p.as_str()));
            assert_eq!(v, SearchValue::Date { prefix: p, value: dr("2026-03") });
        }
        assert_eq!(
            single("Observation", "date=2026-03"),
            SearchValue::Date { prefix: Prefix::Eq, value: dr("2026-03") }
        );
        assert_eq!(single("Patient", "birthdate=le1980"), SearchValue::Date { prefix: Prefix::Le, value: dr("1980") });
        assert_eq!(
            single("Device", "_lastUpdated=gt2026-03-04T10:00:00.123Z"),
            SearchValue::Date { prefix: Prefix::Gt, value: dr("2026-03-04T10:00:00.123Z") }
        );
    }

    #[test]
    fn malformed_dates_are_invalid_values() {
        for (query, reason_part) in [
            ("date=2026-13-01", "is not a valid date"),
            ("date=ge2026-02-30", "is not a valid date"),
            ("date=gt", "a value is required after the prefix `gt`"),
            ("date=xx2026", "unknown prefix `xx`"),
            ("date=GE2026", "unknown prefix `GE`"),
            ("date=ge", "a value is required after the prefix `ge`"),
            ("date=2026-03-04T10", "is not a valid date"),
            ("date=yesterday", "unknown prefix `ye`"),
            ("date=", "a value is required"),
            ("date=2026,", "empty value in a comma-separated list"),
        ] {
            let e = err("Observation", query);
            assert!(matches!(&e, SearchError::InvalidValue { name, .. } if name == "date"), "{query}: {e:?}");
            assert!(reason(e).contains(reason_part), "{query}");
        }
    }

    #[test]
    fn quantities() {
        let q = |prefix, value, low, high, system: Option<&str>, code: Option<&str>| SearchValue::Quantity {
            prefix,
            value,
            precision_low: low,
            precision_high: high,
            system: system.map(str::to_string),
            code: code.map(str::to_string),
        };
        let ucum = Some("http://unitsofmeasure.org");
        assert_eq!(single("Observation", "value-quantity=5.4"), q(Prefix::Eq, 5.4, 5.35, 5.45, None, None));
        assert_eq!(
            single("Observation", "value-quantity=gt5.4|http://unitsofmeasure.org|mmol/L"),
            q(Prefix::Gt, 5.4, 5.35, 5.45, ucum, Some("mmol/L"))
        );
        assert_eq!(single("Observation", "value-quantity=5.4||mg"), q(Prefix::Eq, 5.4, 5.35, 5.45, None, Some("mg")));
        assert_eq!(
            single("Observation", "value-quantity=le100|http://unitsofmeasure.org|"),
            q(Prefix::Le, 100.0, 99.5, 100.5, ucum, None)
        );
        assert_eq!(single("Observation", "value-quantity=ap1e2"), q(Prefix::Ap, 100.0, 50.0, 150.0, None, None));
        assert_eq!(single("Observation", "value-quantity=1e+2"), q(Prefix::Eq, 100.0, 50.0, 150.0, None, None));
        assert_eq!(single("Observation", "value-quantity=-0.5"), q(Prefix::Eq, -0.5, -0.55, -0.45, None, None));
        for (bad, part) in [
            ("value-quantity=abc", "unknown prefix `ab`"),
            ("value-quantity=gtabc", "not a decimal number"),
            ("value-quantity=5.4|mg", "expected `[prefix]number`"),
            ("value-quantity=5.4|a|b|c", "expected `[prefix]number`"),
            ("value-quantity=|http://unitsofmeasure.org|mg", "not a decimal number"),
            ("value-quantity=", "a value is required"),
            ("value-quantity=5.4.1", "not a decimal number"),
        ] {
            let e = err("Observation", bad);
            assert!(matches!(&e, SearchError::InvalidValue { name, .. } if name == "value-quantity"), "{bad}: {e:?}");
            assert!(reason(e).contains(part), "{bad}");
        }
        // `5,4` is two values, each a valid number: a French decimal comma cannot be detected.
        assert_eq!(parse("Observation", "value-quantity=5,4").params[0].values.len(), 2);
    }

    #[test]
    fn strings_and_modifiers() {
        let q = parse("Patient", "name:exact=Müller&given=zo&family:exact=M%C3%BCller");
        assert_eq!(
            q.params[0],
            SearchParam {
                name: "name".into(),
                modifier: Some("exact".into()),
                values: vec![SearchValue::String("Müller".into())]
            }
        );
        assert_eq!(q.params[1].modifier, None);
        assert_eq!(q.params[2].values, vec![SearchValue::String("Müller".into())]);
        let q = parse("Observation", "code:not=2339-0");
        assert_eq!(q.params[0].modifier.as_deref(), Some("not"));
        assert_eq!(q.params[0].name, "code");
    }

    #[test]
    fn unsupported_modifiers() {
        for (rt, query, name) in [
            ("Observation", "code:text=glucose", "code:text"),
            ("Observation", "code:missing=true", "code:missing"),
            ("Observation", "date:missing=true", "date:missing"),
            ("Observation", "subject:Patient=pat-1", "subject:Patient"),
            ("Observation", "subject:identifier=urn:oid:1|x", "subject:identifier"),
            ("Patient", "name:contains=ann", "name:contains"),
            ("Patient", "gender:exact=female", "gender:exact"),
            ("Observation", "value-quantity:not=5", "value-quantity:not"),
            ("Observation", "_count:exact=5", "_count:exact"),
        ] {
            match err(rt, query) {
                SearchError::Unsupported { name: n, .. } => assert_eq!(n, name),
                other => panic!("{query}: {other:?}"),
            }
        }
        assert_eq!(
            reason(err("Observation", "code:text=glucose")),
            "the :text modifier is not supported; `code` accepts only :not"
        );
        assert_eq!(
            reason(err("Observation", "date:missing=true")),
            "the :missing modifier is not supported; `date` accepts no modifiers"
        );
    }

    #[test]
    fn unknown_parameters_strict_and_lenient() {
        assert_eq!(err("Observation", "birthdate=1980"), SearchError::UnknownParameter { name: "birthdate".into() });
        assert_eq!(err("Patient", "code=2339-0"), SearchError::UnknownParameter { name: "code".into() });
        assert_eq!(err("Device", "foo:bar=1"), SearchError::UnknownParameter { name: "foo:bar".into() });
        assert_eq!(
            err("Observation", "_include=Observation:patient"),
            SearchError::UnknownParameter { name: "_include".into() }
        );
        let (q, ignored) =
            parse_query("Observation", "foo=1&code=2339-0&_pretty=true&foo=2&bar:baz=", true).expect("lenient");
        assert_eq!(ignored, vec!["foo", "_pretty", "bar:baz"]);
        assert_eq!(q.params.len(), 1);
        // Lenient mode still refuses malformed values and unsupported modifiers.
        assert!(matches!(
            parse_query("Observation", "foo=1&date=2026-13", true),
            Err(SearchError::InvalidValue { .. })
        ));
        assert!(matches!(parse_query("Observation", "code:text=x", true), Err(SearchError::Unsupported { .. })));
        assert!(matches!(parse_query("Observation", "_count=abc", true), Err(SearchError::InvalidValue { .. })));
    }

    #[test]
    fn only_searchable_types() {
        assert!(
            matches!(parse_query("Encounter", "", false), Err(SearchError::Unsupported { name, .. }) if name == "Encounter")
        );
        assert!(matches!(parse_query("Encounter", "", true), Err(SearchError::Unsupported { .. })));
    }

    #[test]
    fn every_supported_parameter_parses() {
        for (rt, query) in [
            (
                "Observation",
                "_id=glu-1&_lastUpdated=ge2026&patient=pat-1&subject=Patient/pat-1&code=2339-0&category=laboratory&date=2026&device=Device/cgm-1&identifier=urn:oid:1|x&status=final&value-quantity=5.4",
            ),
            (
                "Patient",
                "_id=pat-1&_lastUpdated=2026&identifier=x&name=zo&family=mu&given=an&birthdate=1980&gender=female",
            ),
            ("Device", "_id=cgm-1&_lastUpdated=2026&identifier=x&type=337414009&patient=pat-1&status=active"),
        ] {
            let q = parse(rt, query);
            assert_eq!(q.params.len(), query.split('&').count(), "{rt}");
            for p in &q.params {
                assert!(param_kind(rt, &p.name).is_some());
            }
        }
    }

    #[test]
    fn count_and_offset() {
        assert_eq!(parse("Observation", "_count=10").count, 10);
        assert_eq!(parse("Observation", "_count=0").count, 0);
        assert_eq!(parse("Observation", "_count=1000").count, 1000);
        assert_eq!(parse("Observation", "_count=1001").count, 1000);
        assert_eq!(parse("Observation", "_count=99999999999999999999999999").count, 1000);
        assert_eq!(parse("Observation", "_offset=150").offset, 150);
        for bad in [
            "_count=abc",
            "_count=-1",
            "_count=",
            "_count=1.5",
            "_count=+5",
            "_count= 5",
            "_offset=-1",
            "_offset=x",
            "_offset=99999999999999999999999999",
        ] {
            let e = err("Observation", bad);
            let name = bad.split('=').next().unwrap_or_default();
            assert!(matches!(&e, SearchError::InvalidValue { name: n, .. } if n == name), "{bad}: {e:?}");
        }
        assert_eq!(reason(err("Observation", "_count=-1")), "must be a non-negative integer");
        assert_eq!(reason(err("Observation", "_count=5&_count=6")), "may be given only once");
    }

    #[test]
    fn sort() {
        let key = |p: &str, d| SortKey { param: p.into(), descending: d };
        assert_eq!(parse("Observation", "_sort=date").sort, vec![key("date", false)]);
        assert_eq!(
            parse("Observation", "_sort=-date,_lastUpdated").sort,
            vec![key("date", true), key("_lastUpdated", false)]
        );
        assert_eq!(parse("Patient", "_sort=-_lastUpdated").sort, vec![key("_lastUpdated", true)]);
        assert_eq!(
            reason(err("Observation", "_sort=foo")),
            "cannot sort Observation by `foo`; only by date and _lastUpdated"
        );
        assert_eq!(reason(err("Patient", "_sort=date")), "cannot sort Patient by `date`; only by _lastUpdated");
        assert!(reason(err("Device", "_sort=-date")).contains("only by _lastUpdated"));
        assert!(reason(err("Observation", "_sort=date,")).contains("an empty sort key"));
        assert!(reason(err("Observation", "_sort=date,-date")).contains("more than once"));
        assert!(matches!(err("Observation", "_sort="), SearchError::InvalidValue { .. }));
    }

    #[test]
    fn summary_total_elements_as_of_format() {
        assert!(parse("Observation", "_summary=count").summary_count);
        assert!(matches!(err("Observation", "_summary=true"), SearchError::Unsupported { .. }));
        assert!(matches!(err("Observation", "_summary=data"), SearchError::Unsupported { .. }));
        assert_eq!(reason(err("Observation", "_summary=yes")), "expected count");

        assert!(parse("Observation", "_total=accurate").total_accurate);
        assert!(!parse("Observation", "_total=estimate").total_accurate);
        assert!(!parse("Observation", "_total=none").total_accurate);
        assert!(matches!(err("Observation", "_total=exact"), SearchError::InvalidValue { .. }));

        assert_eq!(
            parse("Observation", "_elements=code,%20valueQuantity,code").elements,
            Some(vec!["code".into(), "valueQuantity".into()])
        );
        assert!(matches!(err("Observation", "_elements=code,"), SearchError::InvalidValue { .. }));
        assert!(matches!(err("Observation", "_elements=value[x]"), SearchError::InvalidValue { .. }));

        let as_of = parse("Observation", "_asOf=2026-03-04T10:00:00+02:00").as_of.expect("asOf");
        assert_eq!(as_of.with_timezone(&Utc), "2026-03-04T08:00:00Z".parse::<DateTime<Utc>>().expect("instant"));
        assert_eq!(as_of.offset().local_minus_utc(), 7200);
        assert!(matches!(err("Observation", "_asOf=2026-03-04"), SearchError::InvalidValue { .. }));

        for ok in [
            "json",
            "application/json",
            "application/fhir%2Bjson",
            "application/fhir+json",
            "application/fhir%2Bjson;%20fhirVersion=4.0",
        ] {
            assert_eq!(parse("Observation", &format!("_format={ok}")), SearchQuery::new("Observation"), "{ok}");
        }
        assert!(matches!(err("Observation", "_format=xml"), SearchError::Unsupported { .. }));
        assert!(matches!(err("Observation", "_format=application/fhir%2Bxml"), SearchError::Unsupported { .. }));
        // `_format` may repeat (it changes nothing); the others may not.
        assert!(parse_query("Observation", "_format=json&_format=json", false).is_ok());
        assert!(matches!(err("Observation", "_total=none&_total=accurate"), SearchError::InvalidValue { .. }));
    }

    #[test]
    fn bad_percent_encoding_is_an_invalid_value() {
        assert!(matches!(err("Observation", "code=%FF"), SearchError::InvalidValue { name, .. } if name == "code"));
        assert!(matches!(err("Observation", "co%FFde=1"), SearchError::InvalidValue { .. }));
        assert!(matches!(err("Observation", "_count=%FF"), SearchError::InvalidValue { name, .. } if name == "_count"));
        // An ignored parameter's value is never looked at.
        assert_eq!(
            parse_query("Observation", "foo=%FF", true).map(|(_, ignored)| ignored),
            Ok(vec!["foo".to_string()])
        );
    }

    #[test]
    fn canonical_query_string_round_trips() {
        for (rt, query) in [
            (
                "Observation",
                "patient=pat-1&code=http://loinc.org|2339-0,15074-8&date=ge2026-03-04T10:00:00%2B02:00&date=lt2026-04&_sort=-date&_count=20&_offset=40",
            ),
            (
                "Observation",
                "value-quantity=ap5.40||mmol/L,gt1e2&category:not=|vital-signs&identifier=urn:oid:1.2\\,3|A\\|B&_total=accurate&_summary=count",
            ),
            (
                "Observation",
                "status=final,amended&code=http://loinc.org|&_lastUpdated=2026-03-04T10:00:00.123Z&_elements=code,valueQuantity&_asOf=2026-03-04T10:00:00.5-05:00",
            ),
            (
                "Patient",
                "name=Anne+Marie&family:exact=M%C3%BCller&birthdate=sa1980-05&gender=female&_sort=_lastUpdated",
            ),
            (
                "Device",
                "patient=https://x.org/fhir/Patient/pat-1&type=http://snomed.info/sct|337414009&status=active&_id=cgm-1&device-name=ignored",
            ),
        ] {
            let (q, _) = parse_query(rt, query, true).expect(query);
            let canonical = q.to_query_string();
            let (again, ignored) = parse_query(rt, &canonical, false).expect(&canonical);
            assert!(ignored.is_empty());
            assert_eq!(again, q, "{canonical}");
            assert_eq!(again.to_query_string(), canonical);
        }
        let q = parse("Observation", "patient=pat-1&date=ge2026-03-04T10:00:00%2B02:00&code=a|b,c");
        assert_eq!(
            q.to_query_string(),
            "patient=Patient/pat-1&date=ge2026-03-04T08:00:00Z&code=a%7Cb,c&_count=50&_offset=0"
        );
        assert_eq!(
            parse("Observation", "_asOf=2026-03-04T10:00:00%2B02:00").to_query_string(),
            "_count=50&_offset=0&_asOf=2026-03-04T10:00:00%2B02:00"
        );
    }
}
