//! Drill reports for auditors: Markdown, or HTML with an SVG chart of recent drills' RTO
//! against the target, drawn from the repository's history.

use std::path::Path;

use crate::error::{Error, Result};
use crate::restore::executor::PlanReport;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn status(s: &crate::validate::Status) -> String {
    format!("{s:?}").to_lowercase()
}

pub fn markdown(r: &PlanReport, past: &[PlanReport]) -> String {
    let mut o = format!(
        "# DR drill report: {}\n\n- started: {}\n- finished: {}\n- result: **{}**\n- target: {}\n- backup used: {}\n- restored to: {}\n- RTO measured: {}\n- RTO target: {:.0}s ({})\n\n## Stages\n\n| stage | kind | status | seconds | detail |\n|---|---|---|---:|---|\n",
        r.plan,
        r.started_at.to_rfc3339(),
        r.finished_at.to_rfc3339(),
        if r.ok { "PASSED" } else { "FAILED" },
        r.target,
        r.backup.clone().unwrap_or_else(|| "-".into()),
        r.restored_to.clone().unwrap_or_else(|| "-".into()),
        r.rto_seconds
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "not measured".into()),
        r.rto_target_seconds,
        match r.rto_met {
            Some(true) => "met",
            Some(false) => "VIOLATED",
            None => "unproven",
        }
    );
    let row = |indent: &str, name: &str, kind: &dyn std::fmt::Display, st, secs: f64, msg: &str| {
        format!(
            "| {indent}{name} | {kind} | {} | {secs:.2} | {} |\n",
            status(st),
            msg.replace('|', "\\|")
        )
    };
    for s in &r.stages {
        o += &row("", &s.name, &s.kind, &s.status, s.seconds, &s.message);
        for c in &s.checks {
            o += &row(
                "&nbsp;&nbsp;",
                &c.name,
                &c.kind,
                &c.status,
                c.seconds,
                &c.message,
            );
        }
    }
    o += "\n## Recent drills\n\n| finished | plan | result | RTO (s) | target (s) |\n|---|---|---|---:|---:|\n";
    for d in past {
        o += &format!(
            "| {} | {} | {} | {} | {:.0} |\n",
            d.finished_at.to_rfc3339(),
            d.plan,
            if d.ok { "passed" } else { "FAILED" },
            d.rto_seconds
                .map(|s| format!("{s:.1}"))
                .unwrap_or_else(|| "-".into()),
            d.rto_target_seconds
        );
    }
    o
}

/// An SVG bar chart: one bar per drill (oldest left), the target as a red line.
pub fn chart(past: &[PlanReport]) -> String {
    let drills: Vec<&PlanReport> = past.iter().rev().collect();
    let (w, h, pad) = (640.0, 240.0, 40.0);
    let target = drills
        .iter()
        .map(|d| d.rto_target_seconds)
        .fold(0.0, f64::max);
    let max = drills
        .iter()
        .filter_map(|d| d.rto_seconds)
        .fold(target, f64::max)
        .max(1.0)
        * 1.1;
    let n = drills.len().max(1) as f64;
    let bw = (w - 2.0 * pad) / n;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / max;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="RTO of recent drills">"#
    );
    s += &format!(
        r##"<line x1="{pad}" y1="{}" x2="{}" y2="{}" stroke="#333"/>"##,
        h - pad,
        w - pad,
        h - pad
    );
    for (i, d) in drills.iter().enumerate() {
        let x = pad + i as f64 * bw + bw * 0.15;
        let v = d.rto_seconds.unwrap_or(0.0);
        let color = if !d.ok {
            "#c0392b"
        } else if d.rto_met == Some(true) {
            "#27ae60"
        } else {
            "#e67e22"
        };
        s += &format!(
            r##"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{}: {}</title></rect>"##,
            y(v),
            bw * 0.7,
            (h - pad - y(v)).max(0.0),
            esc(&d.finished_at.format("%Y-%m-%d").to_string()),
            d.rto_seconds
                .map(|s| format!("{s:.1}s"))
                .unwrap_or_else(|| "failed".into())
        );
    }
    s += &format!(
        r#"<line x1="{pad}" y1="{ty:.1}" x2="{}" y2="{ty:.1}" stroke="red" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" font-size="12" fill="red" text-anchor="end">RTO target {target:.0}s</text>"#,
        w - pad,
        w - pad,
        y(target) - 4.0,
        ty = y(target)
    );
    s += &format!(
        r#"<text x="{pad}" y="16" font-size="12">RTO per drill (seconds, max {max:.0})</text></svg>"#
    );
    s
}

pub fn html(r: &PlanReport, past: &[PlanReport]) -> String {
    let md = markdown(r, past);
    // A small, dependency-free rendering: the tables as HTML, the chart as inline SVG.
    let mut body = String::new();
    let mut in_table = false;
    for line in md.lines() {
        if let Some(t) = line.strip_prefix("# ") {
            body += &format!("<h1>{}</h1>\n", esc(t));
        } else if let Some(t) = line.strip_prefix("## ") {
            if in_table {
                body += "</table>\n";
                in_table = false;
            }
            body += &format!("<h2>{}</h2>\n", esc(t));
            if t == "Recent drills" {
                body += &chart(past);
            }
        } else if let Some(t) = line.strip_prefix("- ") {
            body += &format!("<div>{}</div>\n", esc(&t.replace("**", "")));
        } else if line.starts_with('|') {
            if line.starts_with("|---") {
                continue;
            }
            let cells: Vec<String> = line
                .trim_matches('|')
                .split(" | ")
                .map(|c| esc(c.trim()).replace("&amp;nbsp;", "&nbsp;"))
                .collect();
            if !in_table {
                body += "<table>\n";
                body += &format!(
                    "<tr>{}</tr>\n",
                    cells
                        .iter()
                        .map(|c| format!("<th>{c}</th>"))
                        .collect::<String>()
                );
                in_table = true;
            } else {
                body += &format!(
                    "<tr>{}</tr>\n",
                    cells
                        .iter()
                        .map(|c| format!("<td>{c}</td>"))
                        .collect::<String>()
                );
            }
        }
    }
    if in_table {
        body += "</table>\n";
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>DR drill {}</title><style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>\n{body}</body></html>\n",
        esc(&r.plan)
    )
}

pub fn write(path: &Path, r: &PlanReport, past: &[PlanReport]) -> Result<()> {
    let text = match path.extension().and_then(|e| e.to_str()) {
        Some("html") | Some("htm") => html(r, past),
        Some("md") | Some("markdown") => markdown(r, past),
        _ => {
            return Err(Error::Usage(format!(
                "--report {}: use a .md or .html file name",
                path.display()
            )));
        }
    };
    std::fs::write(path, text).map_err(|e| Error::io(format!("write {}", path.display()), e))
}
