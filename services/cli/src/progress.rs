//! Progress bars per wave (`rollout watch`, `fleetpatch demo`), on
//! `indicatif`: one bar per wave under a heading line, redrawn in place on a
//! terminal, with each wave's rate and ETA. Nothing is drawn when stdout is
//! not a terminal: the callers print plain lines there instead.

use std::collections::BTreeMap;

use fleetpatch_proto::state::RolloutState;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

use crate::output::{self, Counts};

/// Bar width in cells.
const BAR_WIDTH: usize = 40;

/// One wave as the bars show it.
#[derive(Debug, Clone)]
pub struct WaveLine {
    pub name: String,
    pub counts: Counts,
    /// The wave being dispatched now (marked `▸`).
    pub current: bool,
}

impl WaveLine {
    /// Wave `index` of a rollout at `current_wave` in `state`; it is marked
    /// while the rollout dispatches it.
    pub fn of(
        name: &str,
        index: u32,
        total: u64,
        by_state: &BTreeMap<String, u64>,
        current_wave: u32,
        state: RolloutState,
    ) -> Self {
        WaveLine {
            name: name.to_owned(),
            counts: Counts::from_states(total, by_state),
            current: index == current_wave && state == RolloutState::Running,
        }
    }
}

/// A heading and a bar per wave.
pub struct WaveBars {
    multi: MultiProgress,
    heading: ProgressBar,
    waves: Vec<ProgressBar>,
}

impl WaveBars {
    /// Bars drawn on stdout when it is a terminal, hidden otherwise.
    pub fn on_stdout() -> Self {
        Self::with_target(ProgressDrawTarget::stdout())
    }

    pub fn with_target(target: ProgressDrawTarget) -> Self {
        let multi = MultiProgress::with_draw_target(target);
        let heading = multi.add(ProgressBar::new_spinner());
        heading.set_style(ProgressStyle::with_template("{msg}").expect("a valid template"));
        Self { multi, heading, waves: Vec::new() }
    }

    /// Shows this state: the heading, and each wave's done count against its
    /// total, its outcome summary, and (from indicatif) its rate and ETA.
    pub fn update(&mut self, heading: &str, waves: &[WaveLine]) {
        while self.waves.len() < waves.len() {
            let bar = self.multi.add(ProgressBar::new(0));
            bar.set_style(wave_style());
            self.waves.push(bar);
        }
        self.heading.set_message(output::clean(heading));
        let width = waves.iter().map(|w| w.name.chars().count()).max().unwrap_or(0).min(24);
        for (bar, wave) in self.waves.iter().zip(waves) {
            let marker = if wave.current { '▸' } else { ' ' };
            bar.set_prefix(format!("{marker} {:<width$}", output::truncate(&wave.name, width)));
            bar.set_length(wave.counts.total);
            bar.set_position(wave.counts.done());
            bar.set_message(wave.counts.summary());
        }
    }

    /// Leaves the last state drawn.
    pub fn finish(&self) {
        self.heading.finish();
        for bar in &self.waves {
            bar.finish();
        }
    }

    #[cfg(test)]
    fn wave(&self, index: usize) -> &ProgressBar {
        &self.waves[index]
    }
}

/// A wave's bar: its done targets against its total, rate, ETA, summary.
fn wave_style() -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{{prefix}}  [{{bar:{BAR_WIDTH}}}] {{pos:>5}}/{{len:<5}} {{rate:>9}} eta {{eta:<4}} {{msg}}"
    ))
    .expect("a valid template")
    .with_key("rate", |state: &ProgressState, out: &mut dyn std::fmt::Write| {
        let _ = write!(out, "{:.1}/s", state.per_sec());
    })
    .progress_chars("#>.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_wave_gets_a_bar_of_its_done_targets_with_its_summary() {
        let mut bars = WaveBars::with_target(ProgressDrawTarget::hidden());
        let canary = Counts { total: 4, succeeded: 2, failed: 1, in_flight: 1, ..Counts::default() };
        let rest = Counts { total: 6, pending: 6, ..Counts::default() };
        bars.update(
            "rollout \"r\" running",
            &[
                WaveLine { name: "canary".into(), counts: canary, current: true },
                WaveLine { name: "rest\u{1b}[2J".into(), counts: rest, current: false },
            ],
        );
        let first = bars.wave(0);
        assert_eq!((first.position(), first.length()), (3, Some(4)));
        assert_eq!(first.prefix(), "▸ canary  ");
        assert_eq!(first.message(), "3/4 done: 2 ok, 1 failed, 0 timed out; 1 in flight");
        let second = bars.wave(1);
        assert_eq!((second.position(), second.length()), (0, Some(6)));
        assert_eq!(second.prefix(), "  rest [2J", "names are cleaned of control characters");
        // A wave that moves on: the same bar, new counts.
        let done = Counts { total: 6, succeeded: 6, ..Counts::default() };
        bars.update(
            "r",
            &[
                WaveLine { name: "canary".into(), counts: canary, current: false },
                WaveLine { name: "rest".into(), counts: done, current: true },
            ],
        );
        assert_eq!(bars.wave(1).position(), 6);
        bars.finish();
        assert!(bars.wave(1).is_finished());
    }
}
