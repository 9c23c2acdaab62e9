//! What the client commands print: tables, the counts behind the progress
//! bars (drawn by `crate::progress`), times and durations, JSON.
//!
//! Everything a target or an agent sent (errors, output tails, labels) is
//! shown through [`clean`], which removes control characters, so a hostile
//! target cannot move the cursor or recolour the operator's terminal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;

use chrono::{DateTime, Local, Utc};
use clap::ValueEnum;
use fleetpatch_runtime::text::is_bidi_control;
use unicode_width::UnicodeWidthStr;

/// `--output`: a table for people, or JSON for scripts (the API's own
/// documents, so `jq` and `serde_json` parse them back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

/// Whether stdout is a terminal that progress bars can be redrawn on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terminal {
    /// Redraw in place (progress bars); otherwise print a line per change.
    pub redraw: bool,
}

impl Terminal {
    pub fn detect() -> Self {
        let tty = std::io::stdout().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
        Self { redraw: tty }
    }
}

/// Replaces control characters (escape sequences, newlines, tabs) by a
/// space, so a value stays on its line and cannot drive the terminal, and
/// drops bidirectional controls (U+202E would show `exe.gpj` as `jpg.exe`
/// and reorder the rest of the line).
pub fn clean(text: &str) -> String {
    text.chars().filter(|c| !is_bidi_control(*c)).map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Shortens `text` to `max` characters, ending with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    let text = clean(text);
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A text table for people: columns two spaces apart, no borders, cells
/// measured by their display width (comfy-table, with `unicode-width`), so
/// a column of CJK or emoji host names lines up. Every cell goes through
/// [`clean`] first.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    right_aligned: Vec<bool>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: vec![],
            right_aligned: vec![false; headers.len()],
        }
    }

    /// Right-aligns a column (numbers).
    pub fn right(mut self, column: usize) -> Self {
        self.right_aligned[column] = true;
        self
    }

    /// Adds a row; a row of another length than the header is padded with
    /// empty cells or cut, never misaligned.
    pub fn push(&mut self, row: Vec<String>) {
        let mut row: Vec<String> = row.into_iter().map(|cell| clean(&cell)).collect();
        row.resize(self.headers.len(), String::new());
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The display width of each column over the header and the rows so far.
    pub fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.width()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.width());
            }
        }
        widths
    }

    /// Renders with at least the given widths (a paged listing keeps the
    /// first page's widths; a wider cell on a later page widens its column
    /// on that page only).
    pub fn render(&self, header: bool, widths: &[usize]) -> String {
        use comfy_table::{CellAlignment, ColumnConstraint, ContentArrangement, Width};
        let mut table = comfy_table::Table::new();
        table.load_preset(comfy_table::presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
        if header {
            table.set_header(&self.headers);
        } else if self.rows.is_empty() {
            return String::new();
        }
        for row in &self.rows {
            table.add_row(row);
        }
        for (i, column) in table.column_iter_mut().enumerate() {
            column.set_padding((if i == 0 { 0 } else { 2 }, 0));
            let width = widths.get(i).copied().unwrap_or(0) + if i == 0 { 0 } else { 2 };
            column.set_constraint(ColumnConstraint::LowerBoundary(Width::Fixed(width.min(u16::MAX as usize) as u16)));
            if self.right_aligned[i] {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        let mut out = String::new();
        for line in table.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Drops the rows (the next page of a paged listing).
    pub fn clear(&mut self) {
        self.rows.clear();
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(true, &self.widths()))
    }
}

/// A time in the operator's time zone, to the second.
pub fn time(at: DateTime<Utc>) -> String {
    at.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S").to_string()
}

pub fn optional_time(at: Option<DateTime<Utc>>) -> String {
    at.map(time).unwrap_or_else(|| "-".into())
}

/// `850ms`, `12.3s`, `4m05s`, `2h03m`.
pub fn duration(d: chrono::TimeDelta) -> String {
    let ms = d.num_milliseconds().max(0);
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// Pretty JSON for `--output json`.
pub fn json(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

// ------------------------------------------------------------------ progress

/// A wave's (or rollout's) targets by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    /// Never dispatched: the deadline passed before their window.
    pub missed_window: u64,
    pub in_flight: u64,
    /// Unreachable after every try; waiting for the machine to answer.
    pub offline: u64,
    pub pending: u64,
}

impl Counts {
    pub fn from_states(total: u64, by_state: &BTreeMap<String, u64>) -> Self {
        let get = |state: &str| by_state.get(state).copied().unwrap_or(0);
        let in_flight = fleetpatch_proto::state::TargetState::IN_FLIGHT.iter().map(|s| get(s.as_str())).sum();
        let mut counts = Counts {
            total,
            succeeded: get("succeeded"),
            failed: get("failed"),
            timed_out: get("timed_out"),
            cancelled: get("cancelled"),
            missed_window: get("missed_window"),
            in_flight,
            offline: get("offline"),
            pending: 0,
        };
        counts.pending = total.saturating_sub(counts.done() + in_flight + counts.offline);
        counts
    }

    /// Targets in a final state.
    pub fn done(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out + self.cancelled + self.missed_window
    }

    /// "7/10 done: 5 ok, 1 failed, 1 timed out; 2 in flight"
    pub fn summary(&self) -> String {
        let mut text = format!(
            "{}/{} done: {} ok, {} failed, {} timed out",
            self.done(),
            self.total,
            self.succeeded,
            self.failed,
            self.timed_out
        );
        if self.cancelled > 0 {
            let _ = write!(text, ", {} cancelled", self.cancelled);
        }
        if self.missed_window > 0 {
            let _ = write!(text, ", {} missed their window", self.missed_window);
        }
        let _ = write!(text, "; {} in flight", self.in_flight);
        if self.offline > 0 {
            let _ = write!(text, ", {} offline", self.offline);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_its_columns() {
        let mut table = Table::new(&["HOST", "ATTEMPT", "STATE"]).right(1);
        table.push(vec!["web-01.example.com".into(), "1".into(), "succeeded".into()]);
        table.push(vec!["db".into(), "12".into(), "failed\x1b[2J".into()]);
        let expected = "\
HOST                ATTEMPT  STATE
web-01.example.com        1  succeeded
db                       12  failed [2J
";
        assert_eq!(table.to_string(), expected);
    }

    #[test]
    fn a_paged_table_keeps_the_first_widths() {
        let mut table = Table::new(&["A", "B"]);
        table.push(vec!["x".into(), "1".into()]);
        let widths = table.widths();
        let first = table.render(true, &widths);
        table.clear();
        table.push(vec!["longer".into(), "2".into()]);
        assert_eq!(first, "A  B\nx  1\n");
        assert_eq!(table.render(false, &widths), "longer  2\n");
    }

    #[test]
    fn wide_characters_line_up_and_bidi_controls_are_dropped() {
        let mut table = Table::new(&["HOST", "STATE"]);
        table.push(vec!["東京-サーバー01".into(), "succeeded".into()]);
        table.push(vec!["paris-01\u{202e}exe.gpj".into(), "failed".into()]);
        table.push(vec!["a".into(), "x".into(), "an extra cell is dropped".into()]);
        let text = table.to_string();
        assert!(!text.contains('\u{202e}') && !text.contains("extra"), "{text}");
        let starts: Vec<usize> = text.lines().map(|line| line[..line.rfind(' ').unwrap() + 1].width()).collect();
        assert_eq!(starts, [17, 17, 17, 17], "the second column starts at the same display column:\n{text}");
    }

    #[test]
    fn text_from_targets_cannot_drive_the_terminal() {
        assert_eq!(clean("ok\x1b[31mred\nnext\tcol"), "ok [31mred next col");
        assert_eq!(clean("web-01\u{202e}gpj.exe \u{2066}x\u{2069}\u{200f}"), "web-01gpj.exe x");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }

    #[test]
    fn durations_read_naturally() {
        let d = chrono::TimeDelta::milliseconds;
        assert_eq!(duration(d(850)), "850ms");
        assert_eq!(duration(d(12_340)), "12.3s");
        assert_eq!(duration(d(245_000)), "4m05s");
        assert_eq!(duration(d(7_380_000)), "2h03m");
    }

    #[test]
    fn counts_come_from_the_states() {
        let by_state: BTreeMap<String, u64> = [("succeeded", 5), ("failed", 1), ("timed_out", 1), ("running", 2)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let counts = Counts::from_states(10, &by_state);
        assert_eq!((counts.in_flight, counts.pending, counts.done()), (2, 1, 7));
        assert_eq!(counts.summary(), "7/10 done: 5 ok, 1 failed, 1 timed out; 2 in flight");
        let mut by_state = by_state;
        by_state.insert("offline".into(), 1);
        let counts = Counts::from_states(10, &by_state);
        assert_eq!((counts.offline, counts.pending), (1, 0), "offline is neither pending nor done");
        assert_eq!(counts.summary(), "7/10 done: 5 ok, 1 failed, 1 timed out; 2 in flight, 1 offline");
    }
}
