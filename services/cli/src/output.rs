//! What the client commands print: tables, progress bars, times and
//! durations, JSON.
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

/// `--output`: a table for people, or JSON for scripts (the API's own
/// documents, so `jq` and `serde_json` parse them back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

/// How the terminal on stdout can be drawn on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terminal {
    /// Redraw in place (cursor movement); otherwise print a line per change.
    pub redraw: bool,
    /// ANSI colours (off with `NO_COLOR`, or when stdout is not a terminal).
    pub color: bool,
}

impl Terminal {
    pub fn detect() -> Self {
        let tty = std::io::stdout().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
        let color = tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Self { redraw: tty, color }
    }

    #[cfg(test)]
    pub fn plain() -> Self {
        Self { redraw: false, color: false }
    }
}

/// A block of lines redrawn in place on a terminal: each frame moves the
/// cursor up over the previous one and overwrites it. Auto-wrap is off while
/// drawing, so a line wider than the terminal is clipped instead of wrapped
/// and moving up by the number of lines drawn stays right.
#[derive(Debug, Default)]
pub struct Redraw {
    drawn_lines: usize,
}

impl Redraw {
    /// The escape sequences and text that replace the previous frame with `lines`.
    pub fn frame(&mut self, lines: &[String]) -> String {
        let mut text = String::from("\x1b[?7l");
        if self.drawn_lines > 0 {
            text.push_str(&format!("\x1b[{}A", self.drawn_lines));
        }
        for line in lines {
            text.push_str(&format!("\r\x1b[2K{line}\n"));
        }
        text.push_str("\x1b[?7h");
        self.drawn_lines = lines.len();
        text
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

/// A left-aligned text table with two spaces between columns.
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

    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len());
        self.rows.push(row.into_iter().map(|cell| clean(&cell)).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The width of each column over the header and the rows so far.
    pub fn widths(&self) -> Vec<usize> {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        widths
    }

    /// Renders with the given widths (a paged listing keeps the first
    /// page's widths); longer cells push their line out of alignment.
    pub fn render(&self, header: bool, widths: &[usize]) -> String {
        let mut out = String::new();
        let lines = header.then_some(&self.headers).into_iter().chain(&self.rows);
        for row in lines {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let last = i + 1 == row.len();
                let pad = widths[i].saturating_sub(cell.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right_aligned[i] {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    if !last {
                        line.push_str(&" ".repeat(pad));
                    }
                }
            }
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
        let in_flight = ["queued", "probing", "staging", "installing", "running"].iter().map(|s| get(s)).sum();
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

/// One bar of `width` cells: succeeded, failed, timed out, cancelled (and
/// missed their window), in flight, pending (and offline) — in that order. A non-zero share gets at least one cell,
/// so a single failure among thousands stays visible.
pub fn bar(counts: &Counts, width: usize, terminal: Terminal) -> String {
    let parts = [
        counts.succeeded,
        counts.failed,
        counts.timed_out,
        counts.cancelled + counts.missed_window,
        counts.in_flight,
        counts.pending + counts.offline,
    ];
    let total: u64 = parts.iter().sum();
    let mut cells = [0usize; 6];
    if total > 0 {
        for (cell, &count) in cells.iter_mut().zip(&parts) {
            *cell = (count as u128 * width as u128 / total as u128) as usize;
            if count > 0 && *cell == 0 {
                *cell = 1;
            }
        }
        // Give or take the rounding difference from the largest part.
        while cells.iter().sum::<usize>() != width {
            let largest = (0..6).max_by_key(|&i| cells[i]).expect("six parts");
            if cells.iter().sum::<usize>() > width {
                cells[largest] -= 1;
            } else {
                cells[largest] += 1;
            }
        }
    } else {
        cells[5] = width;
    }
    let (glyphs, colors) = if terminal.color {
        (["█", "█", "█", "█", "▒", "░"], ["32", "31", "33", "90", "36", "90"])
    } else {
        (["#", "x", "!", "-", ">", "."], [""; 6])
    };
    let mut out = String::from("[");
    for i in 0..6 {
        if cells[i] == 0 {
            continue;
        }
        if terminal.color {
            let _ = write!(out, "\x1b[{}m{}\x1b[0m", colors[i], glyphs[i].repeat(cells[i]));
        } else {
            out.push_str(&glyphs[i].repeat(cells[i]));
        }
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redraw_moves_up_over_the_previous_frame_and_clears_each_line() {
        let mut redraw = Redraw::default();
        let first = redraw.frame(&["a".to_owned(), "b".to_owned()]);
        assert_eq!(first, "\x1b[?7l\r\x1b[2Ka\n\r\x1b[2Kb\n\x1b[?7h", "nothing to move over yet");
        let second = redraw.frame(&["c".to_owned()]);
        assert!(second.starts_with("\x1b[?7l\x1b[2A\r\x1b[2Kc\n"), "{second:?}");
        let third = redraw.frame(&["d".to_owned()]);
        assert!(third.contains("\x1b[1A"), "moves over the one line drawn last: {third:?}");
    }

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
    }

    #[test]
    fn a_bar_shows_every_outcome_and_fills_its_width() {
        let counts = Counts { total: 1000, succeeded: 990, failed: 1, in_flight: 9, ..Counts::default() };
        let plain = bar(&counts, 20, Terminal::plain());
        assert_eq!(plain, "[##################x>]");
        let empty = bar(&Counts::default(), 5, Terminal::plain());
        assert_eq!(empty, "[.....]");
        let colored = bar(&counts, 20, Terminal { redraw: true, color: true });
        assert!(colored.contains("\x1b[31m█\x1b[0m"), "{colored:?}");
    }
}
