//! `cairn investigate timeline`: everything that touched one patient in a window, in order, from the
//! log (read-only, safe beside a running server), as JSON lines, CSV or a self-contained HTML page.

use crate::auditcmd::{contains, patient_and_window, scan_log};
use crate::datadir::DataDir;
use crate::{TimelineArgs, config, telemetry};
use anyhow::Context;
use cairn_audit::timeline::{TimelineBuilder, TimelineEntry};
use cairn_events::{Event, Timestamp};
use cairn_http::pages::esc;
use cairn_log::embedded::EmbeddedOptions;
use std::io::Write;
use std::process::ExitCode;

pub fn timeline(args: TimelineArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let (id, patient, from, to) = patient_and_window(&args.window)?;
    let backends = config::backends(&args.common)?;
    let data = DataDir::open_existing(&config::data_dir(&args.common)?)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (entries, scanned) = rt.block_on(async {
        let log =
            crate::backends::open_log(&backends, &data, EmbeddedOptions { read_only: true, ..Default::default() })
                .await?
                .as_dyn();
        let mut builder = TimelineBuilder::new(&patient, from, to);
        let scanned = scan_log(log.as_ref(), &format!("for {patient}'s timeline"), &mut |r| {
            // The patient's own events name its id; sign-ins and token grants (cairn.auth) never do
            // and are kept in case an access used them.
            if r.topic != cairn_events::topics::AUTH && !contains(&r.value, id.as_bytes()) {
                return false;
            }
            let Ok(event) = Event::from_canonical_bytes(&r.value) else { return false };
            builder.add(&event, format!("{}:{}:{}", r.topic, r.partition, r.offset));
            true
        })
        .await?;
        anyhow::Ok((builder.finish(), scanned))
    })?;
    let body = match args.format.as_str() {
        "csv" => csv(&entries),
        "html" => html(&patient, from, to, &entries),
        _ => entries.iter().map(|e| serde_json::to_string(e).expect("JSON") + "\n").collect(),
    };
    match &args.out {
        Some(path) => {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, body).with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
        }
        None => std::io::stdout().lock().write_all(body.as_bytes())?,
    }
    eprintln!("{} entries for {patient} from {from} to {to} ({scanned} events read)", entries.len());
    Ok(ExitCode::SUCCESS)
}

const COLUMNS: [&str; 16] = [
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

fn row(e: &TimelineEntry) -> [String; 16] {
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

/// RFC 4180, with a header row.
fn csv(entries: &[TimelineEntry]) -> String {
    let field = |f: &str| {
        if f.contains([',', '"', '\n', '\r']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.to_owned() }
    };
    let mut out = COLUMNS.join(",") + "\r\n";
    for e in entries {
        out += &row(e).iter().map(|f| field(f)).collect::<Vec<_>>().join(",");
        out += "\r\n";
    }
    out
}

/// One self-contained page (no script, no external resource) an investigator can open and print.
fn html(patient: &str, from: Timestamp, to: Timestamp, entries: &[TimelineEntry]) -> String {
    let title = format!("Timeline of {patient}, {from} to {to}");
    let mut out = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
         body{{font:13px/1.4 system-ui,sans-serif;margin:1.5em}}table{{border-collapse:collapse;width:100%}}\
         th,td{{border:1px solid #bbb;padding:3px 5px;text-align:left;vertical-align:top;word-break:break-all}}\
         th{{background:#eee}}tr.refused td{{background:#fdecea}}tr.token td,tr.login td{{color:#555}}\
         @media print{{body{{margin:0}}th{{background:none}}}}</style></head><body>\n<h1>{}</h1>\n\
         <p>{} entries, oldest first, from the event log: every access to the patient's data (refusals \
         shaded), and the token grants and sign-ins behind them. Generated {}.</p>\n<table><thead><tr>",
        esc(&title),
        esc(&title),
        entries.len(),
        esc(&Timestamp::now().to_rfc3339())
    );
    for c in COLUMNS {
        out += &format!("<th>{}</th>", esc(c));
    }
    out += "</tr></thead><tbody>\n";
    for e in entries {
        let class = if e.summary.outcome.starts_with("failure") { "refused" } else { e.kind };
        out += &format!("<tr class=\"{}\">", esc(class));
        for f in row(e) {
            out += &format!("<td>{}</td>", esc(&f));
        }
        out += "</tr>\n";
    }
    out += "</tbody></table>\n</body></html>\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_escapes_what_it_shows() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
        let entry = TimelineEntry {
            kind: "access",
            summary: cairn_audit::summary::Summary {
                user: "<img src=x onerror=alert(1)>".into(),
                ..Default::default()
            },
            version_after: None,
            version_before: None,
            position: "cairn.access:0:1".into(),
        };
        let page = html("Patient/p<1>", Timestamp::from_millis(0), Timestamp::from_millis(1), &[entry]);
        assert!(!page.contains("<img") && page.contains("&lt;img src=x"));
        assert!(!page.contains("Patient/p<1>") && page.contains("Patient/p&lt;1&gt;"));
    }
}
