//! `cairn investigate timeline`: everything that touched one patient in a window, in order, from the
//! log (read-only, safe beside a running server), as JSON lines, CSV or a self-contained HTML page.

use crate::auditcmd::{patient_and_window, progress_line, window};
use crate::datadir::DataDir;
use crate::{SeenArgs, TimelineArgs, config, telemetry};
use anyhow::{Context, bail};
use cairn_audit::seen::{SeenAccess, Viewer};
use cairn_audit::timeline::TimelineEntry;
use cairn_events::Timestamp;
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
        let mut progress = progress_line(format!("for {patient}'s timeline"));
        let found = cairn_audit::scan::timeline(log.as_ref(), &id, from, to, &mut progress).await?;
        progress(u64::MAX, 0);
        anyhow::Ok(found)
    })?;
    let body = match args.output.format.as_str() {
        "csv" => cairn_audit::timeline::to_csv(&entries),
        "html" => html(&patient, from, to, &entries),
        _ => entries.iter().map(|e| serde_json::to_string(e).expect("JSON") + "\n").collect(),
    };
    write_output(args.output.out.as_deref(), &body)?;
    eprintln!("{} entries for {patient} from {from} to {to} ({scanned} events read)", entries.len());
    Ok(ExitCode::SUCCESS)
}

/// `cairn investigate seen`: two passes over the log (the viewer's accesses, then the versions).
pub fn seen(args: SeenArgs) -> anyhow::Result<ExitCode> {
    telemetry::init_cli();
    let (from, to) = window(&args.window.from, &args.window.to)?;
    let viewer = match (&args.user, &args.client) {
        (Some(u), _) => Viewer::User(u.clone()),
        (None, Some(c)) => Viewer::Client(c.clone()),
        (None, None) => bail!("give --user or --client"),
    };
    let who = match &viewer {
        Viewer::User(u) => format!("user {u}"),
        Viewer::Client(c) => format!("client {c}"),
    };
    let backends = config::backends(&args.common)?;
    let data = DataDir::open_existing(&config::data_dir(&args.common)?)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let accesses = rt.block_on(async {
        let log =
            crate::backends::open_log(&backends, &data, EmbeddedOptions { read_only: true, ..Default::default() })
                .await?
                .as_dyn();
        let mut progress = progress_line(format!("read for {who}"));
        let found = cairn_audit::scan::seen(log.as_ref(), viewer, from, to, &mut progress).await?;
        progress(u64::MAX, 0);
        anyhow::Ok(found)
    })?;
    let body = match args.output.format.as_str() {
        "csv" => cairn_audit::seen::to_csv(&accesses),
        "html" => seen_html(&who, from, to, &accesses),
        _ => accesses.iter().map(|a| serde_json::to_string(a).expect("JSON") + "\n").collect(),
    };
    write_output(args.output.out.as_deref(), &body)?;
    let versions: usize = accesses.iter().map(|a| a.returned.len()).sum();
    let missing = accesses.iter().flat_map(|a| &a.returned).filter(|v| v.resource.is_none()).count();
    eprintln!(
        "{} accesses by {who} from {from} to {to}, {versions} versions returned ({missing} not found in the log)",
        accesses.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// To `out` (written beside, then renamed: a reader never finds half a file), or standard output.
fn write_output(out: Option<&std::path::Path>, body: &str) -> anyhow::Result<()> {
    match out {
        Some(path) => {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, body).with_context(|| format!("writing {}", partial.display()))?;
            std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
        }
        None => std::io::stdout().lock().write_all(body.as_bytes())?,
    }
    Ok(())
}

/// The page around a table: title, explanation, print style. No script, nothing fetched.
fn page(title: &str, explanation: &str, table: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\
         body{{font:13px/1.4 system-ui,sans-serif;margin:1.5em}}table{{border-collapse:collapse;width:100%}}\
         th,td{{border:1px solid #bbb;padding:3px 5px;text-align:left;vertical-align:top;word-break:break-all}}\
         th{{background:#eee}}tr.refused td{{background:#fdecea}}tr.token td,tr.login td{{color:#555}}\
         pre{{white-space:pre-wrap;margin:0}}@media print{{body{{margin:0}}th{{background:none}}}}</style></head>\
         <body>\n<h1>{}</h1>\n<p>{} Generated {}.</p>\n{}</body></html>\n",
        esc(title),
        esc(title),
        esc(explanation),
        esc(&Timestamp::now().to_rfc3339()),
        table
    )
}

fn seen_html(who: &str, from: Timestamp, to: Timestamp, accesses: &[SeenAccess]) -> String {
    let mut table = String::from(
        "<table><thead><tr><th>recorded</th><th>interaction</th><th>request</th><th>client</th>\
         <th>request id</th><th>version returned</th><th>content</th></tr></thead><tbody>\n",
    );
    for a in accesses {
        for v in &a.returned {
            let content = match &v.resource {
                Some(r) => serde_json::to_string_pretty(r).expect("JSON"),
                None => "(not in the log)".into(),
            };
            table += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>\n",
                esc(&a.recorded),
                esc(&a.interaction),
                esc(&a.request),
                esc(&a.client),
                esc(&a.request_id),
                esc(&v.reference),
                esc(&content)
            );
        }
    }
    table += "</tbody></table>\n";
    page(
        &format!("What {who} saw, {from} to {to}"),
        &format!(
            "{} reads and searches, oldest first, each with every resource version it returned, as it was then \
             (from the event log).",
            accesses.len()
        ),
        &table,
    )
}

/// One self-contained page (no script, no external resource) an investigator can open and print.
fn html(patient: &str, from: Timestamp, to: Timestamp, entries: &[TimelineEntry]) -> String {
    let mut table = String::from("<table><thead><tr>");
    for c in cairn_audit::timeline::COLUMNS {
        table += &format!("<th>{}</th>", esc(c));
    }
    table += "</tr></thead><tbody>\n";
    for e in entries {
        let class = if e.summary.outcome.starts_with("failure") { "refused" } else { e.kind };
        table += &format!("<tr class=\"{}\">", esc(class));
        for f in cairn_audit::timeline::row(e) {
            table += &format!("<td>{}</td>", esc(&f));
        }
        table += "</tr>\n";
    }
    table += "</tbody></table>\n";
    page(
        &format!("Timeline of {patient}, {from} to {to}"),
        &format!(
            "{} entries, oldest first, from the event log: every access to the patient's data (refusals \
             shaded), and the token grants and sign-ins behind them.",
            entries.len()
        ),
        &table,
    )
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
