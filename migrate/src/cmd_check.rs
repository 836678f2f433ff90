//! `cr-migrate check`: probes this host's kernel features and prints what
//! works, what does not and what each one enables, then the dirty tracker
//! iterative pre-copy would use. `--json` prints the same as one JSON object.
//!
//! The probes themselves live in `crm_engine::features`; this command only
//! formats their reports.

use std::io::Write;

use anyhow::Context as _;
use crm_engine::features::{self, FeatureReport};

/// Runs every probe and prints the reports to stdout.
pub fn run(json: bool) -> anyhow::Result<()> {
    let reports = features::probe_all();
    let tracker = features::dirty_tracker_choice(&reports);
    let text = if json {
        render_json(&reports, tracker)
    } else {
        render_table(&reports, tracker)
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing the check report to stdout")?;
    Ok(())
}

/// The human-readable report: one row per feature, then the tracker.
fn render_table(reports: &[FeatureReport], tracker: &str) -> String {
    let headers = ["FEATURE", "OK", "ENABLES", "DETAIL"];
    let rows: Vec<[&str; 4]> = reports
        .iter()
        .map(|r| {
            [
                r.name,
                if r.available { "yes" } else { "no" },
                r.enables,
                r.detail.as_str(),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: &[&str; 4]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            // A control character (a newline in a detail) would break the row.
            let cell = cell.replace(char::is_control, " ");
            line.push_str(&cell);
            if i + 1 < cells.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(&headers);
    for row in &rows {
        push_row(row);
    }
    let available = reports.iter().filter(|r| r.available).count();
    out.push('\n');
    out.push_str(&format!(
        "{available} of {} features available\ndirty tracker: {tracker}\n",
        reports.len()
    ));
    out
}

/// The machine-readable report (hand-written JSON, no serde).
fn render_json(reports: &[FeatureReport], tracker: &str) -> String {
    let mut out = String::from("{\n  \"features\": [\n");
    for (i, r) in reports.iter().enumerate() {
        out.push_str(&format!(
            "    {{\"name\": {}, \"available\": {}, \"detail\": {}, \"enables\": {}}}{}\n",
            json_string(r.name),
            r.available,
            json_string(&r.detail),
            json_string(r.enables),
            if i + 1 < reports.len() { "," } else { "" },
        ));
    }
    out.push_str(&format!(
        "  ],\n  \"dirty_tracker\": {}\n}}\n",
        json_string(tracker)
    ));
    out
}

/// `s` as a JSON string literal (RFC 8259 escaping).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crm_engine::features::Feature;

    fn sample() -> Vec<FeatureReport> {
        [(Feature::Ptrace, true), (Feature::SoftDirty, false)]
            .into_iter()
            .map(|(f, available)| FeatureReport {
                feature: f,
                name: f.name(),
                available,
                detail: format!("detail of \"{}\"\twith\\escapes\n", f.name()),
                enables: f.enables(),
            })
            .collect()
    }

    #[test]
    fn json_escapes_and_shapes() {
        assert_eq!(json_string("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\u0001é\"");
        let j = render_json(&sample(), "Checksum");
        assert!(j.starts_with("{\n  \"features\": [\n"));
        assert!(j.contains("\"name\": \"ptrace_seize\", \"available\": true"));
        assert!(j.contains("\"name\": \"soft_dirty\", \"available\": false"));
        assert!(j.contains("\\\"ptrace_seize\\\"\\twith\\\\escapes\\n"));
        assert!(j.trim_end().ends_with("\"dirty_tracker\": \"Checksum\"\n}"));
        // exactly one comma between the two feature objects
        assert_eq!(j.matches("},\n").count(), 1);
    }

    #[test]
    fn table_has_a_row_per_feature_and_the_tracker() {
        let t = render_table(&sample(), "Checksum");
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("FEATURE"));
        assert!(lines[1].starts_with("ptrace_seize"));
        assert!(lines[1].contains(" yes "));
        assert!(lines[2].starts_with("soft_dirty"));
        assert!(lines[2].contains(" no "));
        assert!(t.contains("1 of 2 features available"));
        assert!(t.ends_with("dirty tracker: Checksum\n"));
        // columns line up: ENABLES starts at the same offset on every row
        let col = lines[0].find("ENABLES").unwrap();
        assert_eq!(&lines[1][col..col + 8], &Feature::Ptrace.enables()[..8]);
    }

    #[test]
    fn run_probes_this_host() {
        run(false).unwrap();
        run(true).unwrap();
    }
}
