//! CSV for the trail's tables (compliance reports, timelines): RFC 4180, and safe to open in a
//! spreadsheet.

/// One RFC 4180 line, CRLF-terminated. A field that a spreadsheet would take for a formula (starting
/// with `=`, `+`, `-`, `@`, tab or CR: an `X-Request-Id` or a username is whatever a client sent) gets
/// a leading `'`, so opening a report never runs what a client wrote into it.
pub fn line<S: AsRef<str>>(fields: &[S]) -> String {
    let mut out = fields.iter().map(|f| field(f.as_ref())).collect::<Vec<_>>().join(",");
    out.push_str("\r\n");
    out
}

fn field(f: &str) -> String {
    let f = if f.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{f}") } else { f.to_owned() };
    if f.contains([',', '"', '\n', '\r']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f }
}

#[cfg(test)]
mod tests {
    #[test]
    fn fields_are_quoted_and_formulas_neutralised() {
        assert_eq!(super::line(&["a", "b,c", "say \"hi\""]), "a,\"b,c\",\"say \"\"hi\"\"\"\r\n");
        assert_eq!(
            super::line(&["=HYPERLINK(\"x\")", "@SUM(1)", "-1", "+1", "2026-11-28"]),
            "\"'=HYPERLINK(\"\"x\"\")\",'@SUM(1),'-1,'+1,2026-11-28\r\n"
        );
    }
}
