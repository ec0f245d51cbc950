//! The report as one self-contained HTML page: the job's insights, to open from disk or
//! from a CI artifact.
//!
//! Self-contained and inert: no script, font, image or stylesheet is loaded, and the
//! page's Content-Security-Policy (`default-src 'none'; style-src 'unsafe-inline'`) says
//! so to the browser as well, so even a string that escaped its escaping could not run
//! or fetch anything. Every string that came from the network or a process (DNS names,
//! comm, executables, step and job names, findings) goes through [`esc`]: a hostile name
//! shows as text.
//!
//! Readable on a phone (below 700 px the tables become one card per row) and in dark mode
//! (`prefers-color-scheme`).

use super::*;

/// Escapes text for HTML element content and double-quoted attribute values; control
/// characters are shown as escapes first (as in the text report).
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in text_clean(s).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = r#"
:root{--bg:#fff;--fg:#1b1f24;--muted:#59636e;--line:#d1d9e0;--card:#f6f8fa;
--bad:#cf222e;--badbg:#ffebe9;--warn:#9a6700;--warnbg:#fff8c5;--new:#8250df;--newbg:#fbefff;--ok:#1a7f37}
@media (prefers-color-scheme: dark){:root{--bg:#0d1117;--fg:#e6edf3;--muted:#9198a1;--line:#3d444d;
--card:#151b23;--bad:#ff7b72;--badbg:#3c1618;--warn:#d29922;--warnbg:#3a2d0b;--new:#d2a8ff;--newbg:#2e1f4a;--ok:#3fb950}}
*{box-sizing:border-box}
body{margin:0;padding:1rem;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1200px;margin:auto}
h1{font-size:1.4rem;margin:.2rem 0 1rem}h2{font-size:1.15rem;margin:1.6rem 0 .6rem;border-bottom:1px solid var(--line)}
h3{font-size:1rem;margin:1.1rem 0 .4rem}
.addr{white-space:nowrap}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;overflow-wrap:anywhere}
.muted{color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(8.5rem,1fr));gap:.6rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.6rem .8rem}
.card b{display:block;font-size:1.5rem}
.card.bad b{color:var(--bad)}.card.new b{color:var(--new)}.card.warn b{color:var(--warn)}
table{border-collapse:collapse;width:100%;margin:.4rem 0}
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:.8rem;text-transform:uppercase;color:var(--muted)}
td.n{text-align:right}
tr.blocked td{background:var(--badbg)}tr.audited td{background:var(--warnbg)}
tr.new td:first-child{box-shadow:inset 4px 0 var(--new)}
.v-blocked{color:var(--bad);font-weight:600}.v-audited{color:var(--warn);font-weight:600}.v-allowed{color:var(--ok)}
.tag{display:inline-block;border-radius:1em;padding:0 .5em;font-size:.75rem;font-weight:600;margin-left:.3em}
.tag.new{background:var(--newbg);color:var(--new);border:1px solid var(--new)}
.tag.blocked{background:var(--badbg);color:var(--bad);border:1px solid var(--bad)}
.tag.audited{background:var(--warnbg);color:var(--warn);border:1px solid var(--warn)}
.chain{color:var(--muted);font-size:.85em}
.notice{border-left:4px solid var(--warn);background:var(--warnbg);padding:.5rem .8rem;margin:.5rem 0}
.newbox{border-left:4px solid var(--new);background:var(--newbg);padding:.5rem .8rem;margin:.5rem 0}
ol.timeline{list-style:none;padding:0;margin:0;border-left:2px solid var(--line)}
ol.timeline li{position:relative;padding:.2rem 0 .8rem 1rem}
ol.timeline li::before{content:"";position:absolute;left:-7px;top:.55rem;width:12px;height:12px;
border-radius:50%;background:var(--bg);border:2px solid var(--muted)}
ol.timeline li.bad::before{border-color:var(--bad);background:var(--bad)}
ol.timeline li.new::before{border-color:var(--new)}
.chips{display:flex;flex-wrap:wrap;gap:.3rem;margin-top:.3rem}
.chip{border:1px solid var(--line);border-radius:4px;padding:0 .4em;font-size:.85em}
.chip.blocked{border-color:var(--bad);color:var(--bad)}.chip.audited{border-color:var(--warn);color:var(--warn)}
.chip.new{outline:2px solid var(--new)}
footer{margin-top:2rem;color:var(--muted);font-size:.8rem}
@media (max-width:700px){
body{padding:.6rem}
table,thead,tbody,tr,th,td{display:block;width:100%}
thead{display:none}
tr{border:1px solid var(--line);border-radius:8px;margin:.5rem 0;padding:.3rem .5rem;background:var(--card)}
td{border:0;padding:.15rem 0}td.n{text-align:left}
td::before{content:attr(data-label) ": ";color:var(--muted);font-size:.8rem;text-transform:uppercase}
}
"#;

/// A table: `head` the column labels (static text; also each cell's label on a phone),
/// each row its class and cells (already escaped HTML).
fn table(out: &mut String, head: &[&str], rows: &[(String, Vec<String>)], numeric: &[usize]) {
    out.push_str("<table><thead><tr>");
    for h in head {
        let _ = write!(out, "<th>{h}</th>");
    }
    out.push_str("</tr></thead><tbody>\n");
    for (class, cells) in rows {
        if class.is_empty() {
            out.push_str("<tr>");
        } else {
            let _ = write!(out, "<tr class=\"{class}\">");
        }
        for (i, (c, h)) in cells.iter().zip(head).enumerate() {
            let n = if numeric.contains(&i) {
                " class=\"n\""
            } else {
                ""
            };
            let _ = write!(out, "<td data-label=\"{h}\"{n}>{c}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table>\n");
}

/// The process that made a call, with its executable and parent chain.
fn process_html(r: &Row) -> String {
    if r.first_pid == 0 {
        return "<span class=\"muted\">unknown</span>".to_owned();
    }
    let mut s = format!("<code>{}[{}]</code>", esc(&r.first_comm), r.first_pid);
    if let Some(exe) = &r.first_exe {
        let _ = write!(s, " <code class=\"muted\">{}</code>", esc(exe));
    }
    if !r.first_parents.is_empty() {
        s.push_str("<div class=\"chain\">");
        for a in r.first_parents.iter() {
            let exe = a.exe.as_deref().map_or_else(|| "?".to_owned(), esc);
            let _ = write!(s, "← <code>{exe}[{}]</code> ", a.pid);
        }
        s.push_str("</div>");
    }
    s
}

fn verdict_html(v: Verdict) -> String {
    format!("<span class=\"v-{v}\">{v}</span>")
}

fn new_tag(new: bool) -> &'static str {
    if new {
        "<span class=\"tag new\">new</span>"
    } else {
        ""
    }
}

/// The class of a row: its verdict when it needs attention, and `new`.
fn row_class(v: Verdict, new: bool) -> String {
    let mut c = match v {
        Verdict::Blocked => "blocked".to_owned(),
        Verdict::Audited => "audited".to_owned(),
        Verdict::Allowed => String::new(),
    };
    if new {
        if !c.is_empty() {
            c.push(' ');
        }
        c.push_str("new");
    }
    c
}

fn dest_html(domain: Option<&str>) -> String {
    match domain {
        Some(d) => format!("<code>{}</code>", esc(d)),
        None => "<span class=\"muted\">(no DNS name)</span>".to_owned(),
    }
}

/// A step's calls as table rows.
fn call_rows(calls: &[(CallKey, Row)]) -> Vec<(String, Vec<String>)> {
    calls
        .iter()
        .map(|(k, row)| {
            let new = row.new;
            (
                row_class(k.verdict, new),
                vec![
                    format!("{}{}", dest_html(k.domain.as_deref()), new_tag(new)),
                    format!("<code class=\"addr\">{}</code>", k.dst),
                    k.port.to_string(),
                    k.proto.to_string(),
                    verdict_html(k.verdict),
                    row.count.to_string(),
                    process_html(row),
                ],
            )
        })
        .collect()
}

const CALL_HEAD: [&str; 7] = [
    "Destination",
    "Address",
    "Port",
    "Proto",
    "Verdict",
    "Count",
    "Process",
];

pub(super) fn render(r: &Report) -> String {
    let mut out = String::with_capacity(16 << 10);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"color-scheme\" content=\"light dark\">\n\
         <title>ringfence: job {}</title>\n<style>{CSS}</style></head>\n<body>\n",
        esc(&r.job)
    );
    let _ =
        writeln!(
        out,
        "<h1>ringfence insights: job <code>{}</code> <span class=\"tag {}\">{} mode</span></h1>",
        esc(&r.job),
        if r.mode == "block" { "blocked" } else { "audited" },
        esc(&r.mode)
    );

    // Summary.
    let names = r.dns.len();
    let direct_ip: usize = r
        .rows
        .iter()
        .filter(|(k, _)| k.reason == Reason::DirectIp)
        .map(|(_, row)| row.count)
        .sum::<usize>()
        + r.folded
            .iter()
            .filter(|(k, _)| k.reason == Reason::DirectIp)
            .map(|(_, n)| n)
            .sum::<usize>();
    let findings = r.findings.len() + r.alerts.len();
    let new = r.new_calls();
    out.push_str("<section class=\"cards\" id=\"summary\">\n");
    let card = |out: &mut String, class: &str, n: usize, what: &str| {
        let _ = writeln!(out, "<div class=\"card {class}\"><b>{n}</b>{what}</div>");
    };
    card(&mut out, "", r.flows, "calls");
    card(&mut out, "", names, "DNS names");
    card(
        &mut out,
        if r.blocked > 0 { "bad" } else { "" },
        r.blocked,
        "blocked",
    );
    card(
        &mut out,
        if r.audited > 0 { "warn" } else { "" },
        r.audited,
        "audited (would be blocked)",
    );
    card(
        &mut out,
        if direct_ip > 0 { "bad" } else { "" },
        direct_ip,
        "direct-IP attempts",
    );
    card(
        &mut out,
        if findings > 0 { "warn" } else { "" },
        findings,
        "findings",
    );
    if let Some(new) = &new {
        let dests: BTreeSet<String> = new
            .iter()
            .flat_map(|(_, _, c)| c)
            .map(|(k, _)| crate::trail::baseline::destination(k.domain.as_deref(), k.dst, k.port))
            .collect();
        card(
            &mut out,
            if dests.is_empty() { "" } else { "new" },
            dests.len(),
            "new since the baseline",
        );
    }
    out.push_str("</section>\n");

    for w in &r.warnings {
        let _ = writeln!(out, "<p class=\"notice\"><b>warning:</b> {}</p>", esc(w));
    }
    let notes = r.cut_notes();
    if !notes.is_empty() {
        out.push_str("<div class=\"notice\"><b>Cut to stay within limits:</b><ul>");
        for n in &notes {
            let _ = write!(out, "<li>{}</li>", esc(n));
        }
        out.push_str("</ul></div>\n");
    }

    // New since the baseline: first, it is what the reader came for.
    if let Some(new) = &new {
        let _ = writeln!(out, "<h2 id=\"new\">{}</h2>", esc(&r.new_heading(new)));
        for (i, label, calls) in new {
            let _ = writeln!(
                out,
                "<div class=\"newbox\"><h3>{}</h3>",
                esc(&step_title(*i, *label))
            );
            table(&mut out, &CALL_HEAD, &call_rows(calls), &[2, 5]);
            out.push_str("</div>\n");
        }
        if let Some(n) = r.baseline_note() {
            let _ = writeln!(out, "<p class=\"notice\">{}</p>", esc(&n));
        }
    }

    // Timeline of the steps.
    if !r.steps.is_empty() {
        out.push_str("<h2 id=\"timeline\">Timeline</h2>\n<ol class=\"timeline\">\n");
        for (i, st) in r.steps.iter().enumerate() {
            let calls = r.step_calls(i);
            let blocked = calls
                .iter()
                .filter(|(k, _)| k.verdict != Verdict::Allowed)
                .count();
            let fresh = calls.iter().filter(|(_, c)| c.new).count();
            let n: usize = calls.iter().map(|(_, row)| row.count).sum::<usize>() + st.folded;
            let class = match (blocked > 0, fresh > 0) {
                (true, _) => " class=\"bad\"",
                (false, true) => " class=\"new\"",
                _ => "",
            };
            let when = st
                .started
                .map(|t| format!("<span class=\"muted mono\">{}</span> ", format_ts(t)))
                .unwrap_or_default();
            let _ = write!(
                out,
                "<li{class}>{when}<a href=\"#step-{}\"><b>{}</b></a> <span class=\"muted\">{n} calls",
                i + 1,
                esc(&step_title(i, st.label.as_deref()))
            );
            if blocked > 0 {
                let _ = write!(out, ", {blocked} blocked or audited");
            }
            if fresh > 0 {
                let _ = write!(out, ", {fresh} new");
            }
            out.push_str("</span><div class=\"chips\">");
            for (k, c) in &calls {
                let fresh = c.new;
                let mut class = match k.verdict {
                    Verdict::Allowed => "chip".to_owned(),
                    v => format!("chip {v}"),
                };
                if fresh {
                    class.push_str(" new");
                }
                let name = k.domain.clone().unwrap_or_else(|| k.dst.to_string());
                let _ = write!(
                    out,
                    "<span class=\"{class}\">{}:{}</span>",
                    esc(&name),
                    k.port
                );
            }
            out.push_str("</div></li>\n");
        }
        out.push_str("</ol>\n");
    }

    // Per step, the calls.
    out.push_str("<h2 id=\"steps\">Outbound calls made from each step</h2>\n");
    if r.steps.is_empty() {
        out.push_str("<p>No outbound calls.</p>\n");
    }
    for (i, st) in r.steps.iter().enumerate() {
        let _ = writeln!(
            out,
            "<h3 id=\"step-{}\">{}</h3>",
            i + 1,
            esc(&step_title(i, st.label.as_deref()))
        );
        let calls = r.step_calls(i);
        if calls.is_empty() && st.folded == 0 {
            out.push_str("<p class=\"muted\">No outbound calls.</p>\n");
            continue;
        }
        table(&mut out, &CALL_HEAD, &call_rows(&calls), &[2, 5]);
        if st.folded > 0 {
            let _ = writeln!(
                out,
                "<p class=\"muted\">(and {} calls not listed: see the cut notes)</p>",
                st.folded
            );
        }
    }

    // Every flow, with its reason (inbound connections and folded rows included).
    let rows: Vec<(String, Vec<String>)> = r
        .sorted_rows()
        .into_iter()
        .map(|(k, row)| {
            // Only outbound flows have steps: an inbound peer is no destination.
            let new = r.is_new_row(k, row);
            (
                row_class(k.verdict, new),
                vec![
                    format!("{}{}", dest_html(k.domain.as_deref()), new_tag(new)),
                    format!("<code class=\"addr\">{}</code>", k.dst),
                    k.port.to_string(),
                    k.proto.to_string(),
                    verdict_html(k.verdict),
                    esc(&k.reason.to_string()),
                    row.count.to_string(),
                    process_html(row),
                ],
            )
        })
        .chain(r.sorted_folds().into_iter().map(|(k, n)| {
            (
                row_class(k.verdict, false),
                vec![
                    "(others)".to_owned(),
                    "*".to_owned(),
                    "-".to_owned(),
                    Proto::from(k.proto).to_string(),
                    verdict_html(k.verdict),
                    k.reason.to_string(),
                    n.to_string(),
                    "-".to_owned(),
                ],
            )
        }))
        .collect();
    out.push_str("<h2 id=\"flows\">All flows</h2>\n");
    if rows.is_empty() {
        out.push_str("<p>No flows.</p>\n");
    } else {
        table(
            &mut out,
            &[
                "Destination",
                "Address",
                "Port",
                "Proto",
                "Verdict",
                "Reason",
                "Count",
                "First process",
            ],
            &rows,
            &[2, 6],
        );
    }

    // DNS: the names each address came from, then each name's answers.
    if !r.dns.is_empty() {
        let mut by_addr: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
        for (name, row) in &r.dns {
            for ip in &row.addrs {
                by_addr.entry(*ip).or_default().push(name);
            }
        }
        out.push_str("<h2 id=\"dns\">DNS</h2>\n");
        if !by_addr.is_empty() {
            out.push_str("<h3>The names each address came from</h3>\n");
            let rows: Vec<_> = by_addr
                .iter()
                .map(|(ip, names)| {
                    let names: Vec<String> = names
                        .iter()
                        .map(|n| format!("<code>{}</code>", esc(n)))
                        .collect();
                    (
                        String::new(),
                        vec![format!("<code>{ip}</code>"), names.join(", ")],
                    )
                })
                .collect();
            table(&mut out, &["Address", "Names"], &rows, &[]);
        }
        out.push_str("<h3>Answers</h3>\n");
        let rows: Vec<_> = r
            .dns
            .iter()
            .map(|(name, row)| {
                let answers = if row.is_empty() {
                    row.rcodes.join(", ")
                } else {
                    super::join_answers(row)
                };
                (
                    String::new(),
                    vec![
                        format!("<code>{}</code>", esc(name)),
                        format!("<code>{}</code>", esc(&answers)),
                        if row.bound { "bound" } else { "not bound" }.to_owned(),
                        row.count.to_string(),
                    ],
                )
            })
            .collect();
        table(
            &mut out,
            &["Name", "Answers", "Policy", "Count"],
            &rows,
            &[3],
        );
    }

    // Findings.
    let cells = r.finding_cells();
    let alerts = r.alert_lines();
    if !cells.is_empty() || !alerts.is_empty() {
        out.push_str("<h2 id=\"findings\">Findings</h2>\n");
    }
    if !cells.is_empty() {
        out.push_str("<h3>DNS exfiltration signals (value above threshold)</h3>\n");
        let rows: Vec<_> = cells
            .into_iter()
            .map(|c| ("audited".to_owned(), c.iter().map(|s| esc(s)).collect()))
            .collect();
        table(
            &mut out,
            &["Domain", "Signal", "Value", "Threshold", "Count", "Example"],
            &rows,
            &[2, 3, 4],
        );
    }
    if !alerts.is_empty() {
        out.push_str("<h3>What the dataplane cannot judge</h3>\n<ul>\n");
        for a in alerts {
            let _ = writeln!(out, "<li>{}</li>", esc(&a));
        }
        out.push_str("</ul>\n");
    }
    let _ = writeln!(
        out,
        "<footer>ringfence {} · {}</footer>\n</body></html>",
        env!("CARGO_PKG_VERSION"),
        esc(&r.summary())
    );
    out
}
