//! `rollout watch`: progress bars per wave (`crate::progress`), redrawn until the rollout is
//! completed, paused or aborted; the exit status says how it ended.
//!
//! On a terminal the bars are redrawn in place; otherwise (a pipe, CI) a
//! line is printed whenever the counts change. With `--output json` each
//! change is one line holding the API's rollout document.

use std::io::Write;
use std::time::{Duration, Instant};

use fleetpatch_proto::state::{RolloutState, TargetState};
use uuid::Uuid;

use crate::client::{ApiClient, ClientError, RolloutDetail, TargetView};
use crate::exit::{self, Failure};
use crate::output::{self, Counts, OutputFormat, Terminal};
use crate::progress::{WaveBars, WaveLine};

/// How long the API may stay unreachable during a watch before giving up.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(60);

/// The exit status for a rollout that stopped moving, if it did.
pub fn outcome(detail: &RolloutDetail) -> Option<u8> {
    let counts = Counts::from_states(detail.progress.total, &detail.progress.by_state);
    match detail.rollout.state {
        // A window opens by itself: keep watching (the heading shows when).
        RolloutState::Running | RolloutState::WaitingForWindow => None,
        RolloutState::Completed if counts.succeeded == counts.total => Some(exit::OK),
        RolloutState::Completed => Some(exit::TARGETS_FAILED),
        RolloutState::Paused => Some(exit::PAUSED),
        RolloutState::Aborted => Some(exit::ABORTED),
        RolloutState::AwaitingApproval => {
            // The wave that ended is the one before `current_wave`.
            let ended = detail.rollout.current_wave.checked_sub(1).and_then(|w| detail.rollout.waves.get(w as usize));
            match ended {
                Some(wave) if wave.promote_after_seconds.is_some() => None,
                _ => Some(exit::AWAITING_APPROVAL),
            }
        }
    }
}

/// The heading: the rollout, its state and age, and why it stopped or waits.
fn heading(detail: &RolloutDetail) -> String {
    let rollout = &detail.rollout;
    let elapsed = rollout.completed_at.unwrap_or_else(chrono::Utc::now) - rollout.created_at;
    let mut heading = format!(
        "rollout {:?} {}  {}  {}",
        output::clean(&rollout.name),
        rollout.id,
        rollout.state,
        output::duration(elapsed)
    );
    if let Some(reason) = &rollout.pause_reason {
        heading.push_str(&format!(" ({})", output::clean(reason)));
    }
    heading
}

/// Each wave's counts, the one being dispatched marked.
fn wave_lines(detail: &RolloutDetail) -> Vec<WaveLine> {
    let rollout = &detail.rollout;
    detail
        .progress
        .waves
        .iter()
        .map(|w| WaveLine::of(&w.name, w.index, w.total, &w.by_state, rollout.current_wave, rollout.state))
        .collect()
}

/// The final state as text (a pipe or a log, where no bars are drawn): the
/// heading, then a line per wave.
pub fn frame(detail: &RolloutDetail) -> Vec<String> {
    let waves = wave_lines(detail);
    let width = waves.iter().map(|w| w.name.chars().count()).max().unwrap_or(0).min(24);
    let mut lines = vec![heading(detail)];
    for wave in waves {
        let marker = if wave.current { '▸' } else { ' ' };
        let name = output::truncate(&wave.name, width);
        lines.push(format!("{marker} {name:<width$}  {}", wave.counts.summary()));
    }
    lines
}

/// A one-line form of the frame for logs and pipes.
fn plain_line(detail: &RolloutDetail) -> String {
    let overall = Counts::from_states(detail.progress.total, &detail.progress.by_state);
    let waves: Vec<String> = detail
        .progress
        .waves
        .iter()
        .map(|w| {
            let c = Counts::from_states(w.total, &w.by_state);
            format!("{} {}/{}", output::clean(&w.name), c.done(), c.total)
        })
        .collect();
    format!(
        "{} {}: {} [{}]",
        chrono::Local::now().format("%H:%M:%S"),
        detail.rollout.state,
        overall.summary(),
        waves.join(", ")
    )
}

pub async fn watch(api: &ApiClient, id: Uuid, interval: Duration, format: OutputFormat) -> Result<u8, Failure> {
    let terminal = Terminal::detect();
    let mut stdout = std::io::stdout();
    let io = |e: std::io::Error| Failure::new(exit::ERROR, format!("writing the output: {e}"));
    let mut bars = (format == OutputFormat::Table && terminal.redraw).then(WaveBars::on_stdout);
    let mut last_shown: Option<String> = None;
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let (raw, detail) = match api.rollout_detail(id).await {
            Ok(answer) => {
                unreachable_since = None;
                answer
            }
            Err(error @ (ClientError::Unreachable { .. } | ClientError::Unavailable { .. })) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > UNREACHABLE_GRACE {
                    return Err(error.into());
                }
                eprintln!("{error}; retrying");
                tokio::time::sleep(interval.max(Duration::from_secs(1))).await;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        let outcome = outcome(&detail);
        match format {
            OutputFormat::Json => {
                let line = raw.to_string();
                // Only changes (timestamps aside, the document changes when progress does).
                let key = serde_json::to_string(&(&raw["rollout"]["state"], &raw["progress"])).unwrap_or_default();
                if last_shown.as_deref() != Some(key.as_str()) || outcome.is_some() {
                    writeln!(stdout, "{line}").map_err(io)?;
                    last_shown = Some(key);
                }
            }
            OutputFormat::Table if bars.is_some() => {
                if let Some(bars) = bars.as_mut() {
                    bars.update(&heading(&detail), &wave_lines(&detail));
                }
            }
            OutputFormat::Table => {
                let line = plain_line(&detail);
                let key = line.split_once(' ').map(|(_, rest)| rest.to_owned()).unwrap_or_default();
                if last_shown.as_deref() != Some(key.as_str()) {
                    writeln!(stdout, "{line}").map_err(io)?;
                    last_shown = Some(key);
                }
            }
        }
        stdout.flush().map_err(io)?;
        if let Some(code) = outcome {
            if format == OutputFormat::Table {
                match &bars {
                    Some(bars) => bars.finish(),
                    None => {
                        for line in frame(&detail) {
                            writeln!(stdout, "{line}").map_err(io)?;
                        }
                    }
                }
                let unsuccessful = if code == exit::OK { vec![] } else { unsuccessful_targets(api, id).await };
                write!(stdout, "{}", conclusion(&detail, code, &unsuccessful)).map_err(io)?;
            }
            return Ok(code);
        }
        tokio::time::sleep(interval).await;
    }
}

/// The first failed and timed-out targets, to name them at the end.
async fn unsuccessful_targets(api: &ApiClient, id: Uuid) -> Vec<TargetView> {
    let mut targets = Vec::new();
    for state in [TargetState::Failed, TargetState::TimedOut] {
        if let Ok(page) = api.targets_page(id, Some(state), None, 10).await {
            targets.extend(page.targets.iter().filter_map(|raw| serde_json::from_value(raw.clone()).ok()));
        }
    }
    targets.truncate(10);
    targets
}

/// What the watch ends with: how the rollout ended and what to do next.
pub fn conclusion(detail: &RolloutDetail, code: u8, unsuccessful: &[TargetView]) -> String {
    let id = detail.rollout.id;
    let counts = Counts::from_states(detail.progress.total, &detail.progress.by_state);
    let mut out = match code {
        exit::OK => format!("rollout completed: all {} targets succeeded\n", counts.total),
        exit::TARGETS_FAILED => format!(
            "rollout completed, but {} of {} targets did not succeed ({} failed, {} timed out, {} cancelled, {} \
             missed their window)\n",
            counts.total - counts.succeeded,
            counts.total,
            counts.failed,
            counts.timed_out,
            counts.cancelled,
            counts.missed_window
        ),
        exit::PAUSED => format!(
            "rollout paused: {}\nresume it with: fleetpatch rollout resume {id}\n",
            output::clean(detail.rollout.pause_reason.as_deref().unwrap_or("no reason given"))
        ),
        _ => format!("rollout aborted: {}\n", counts.summary()),
    };
    for target in unsuccessful {
        out.push_str(&format!(
            "  {} {} {}: {}\n",
            target.id,
            output::clean(&target.host),
            target.state,
            output::truncate(target.error.as_deref().unwrap_or("-"), 100)
        ));
    }
    if counts.failed + counts.timed_out > 0 {
        out.push_str(&format!(
            "see them with: fleetpatch targets {id} --state failed (or timed_out); retry: fleetpatch rollout retry-failed {id}\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ProgressView, RolloutView, WaveProgressView, WaveView};

    fn detail(state: RolloutState, waves: &[(&str, &[(&str, u64)])]) -> RolloutDetail {
        let progress_waves: Vec<WaveProgressView> = waves
            .iter()
            .enumerate()
            .map(|(i, (name, states))| WaveProgressView {
                index: i as u32,
                name: name.to_string(),
                total: states.iter().map(|(_, n)| n).sum(),
                by_state: states.iter().map(|(s, n)| (s.to_string(), *n)).collect(),
            })
            .collect();
        let mut by_state = std::collections::BTreeMap::new();
        for wave in &progress_waves {
            for (s, n) in &wave.by_state {
                *by_state.entry(s.clone()).or_insert(0) += n;
            }
        }
        RolloutDetail {
            rollout: RolloutView {
                id: Uuid::nil(),
                name: "r".into(),
                state,
                pause_reason: (state == RolloutState::Paused).then(|| "wave \"canary\" over 25%".into()),
                current_wave: 0,
                concurrency: 2,
                timeout_seconds: 60,
                waves: waves
                    .iter()
                    .map(|(n, _)| WaveView {
                        name: n.to_string(),
                        size: None,
                        max_failure_percent: 100.0,
                        ..Default::default()
                    })
                    .collect(),
                created_at: "2024-05-01T10:00:00Z".parse().unwrap(),
                completed_at: Some("2024-05-01T10:01:05Z".parse().unwrap()),
            },
            progress: ProgressView {
                total: progress_waves.iter().map(|w| w.total).sum(),
                by_state,
                waves: progress_waves,
            },
            patches: vec![],
        }
    }

    #[test]
    fn the_exit_status_says_how_the_rollout_ended() {
        let ok: &[(&str, u64)] = &[("succeeded", 3)];
        let mixed: &[(&str, u64)] = &[("succeeded", 2), ("timed_out", 1)];
        assert_eq!(outcome(&detail(RolloutState::Running, &[("all", ok)])), None);
        assert_eq!(outcome(&detail(RolloutState::Completed, &[("all", ok)])), Some(exit::OK));
        assert_eq!(outcome(&detail(RolloutState::Completed, &[("all", mixed)])), Some(exit::TARGETS_FAILED));
        assert_eq!(outcome(&detail(RolloutState::Paused, &[("all", mixed)])), Some(exit::PAUSED));
        assert_eq!(outcome(&detail(RolloutState::Aborted, &[("all", ok)])), Some(exit::ABORTED));
        // Waiting after the canary: for an operator, or for the wave's automatic promotion.
        let mut waiting = detail(RolloutState::AwaitingApproval, &[("canary", ok), ("rest", &[("pending", 6)])]);
        waiting.rollout.current_wave = 1;
        assert_eq!(outcome(&waiting), Some(exit::AWAITING_APPROVAL));
        waiting.rollout.waves[0].promote_after_seconds = Some(3600);
        assert_eq!(outcome(&waiting), None, "a wave that promotes itself is watched on");
    }

    #[test]
    fn the_text_frame_has_a_line_per_wave() {
        let canary: &[(&str, u64)] = &[("succeeded", 2), ("failed", 1), ("running", 1)];
        let rest: &[(&str, u64)] = &[("pending", 6)];
        let lines = frame(&detail(RolloutState::Running, &[("canary", canary), ("rest", rest)]));
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("rollout \"r\" 00000000-0000-0000-0000-000000000000  running  1m05s"),
            "{lines:?}"
        );
        assert_eq!(lines[1], "▸ canary  3/4 done: 2 ok, 1 failed, 0 timed out; 1 in flight");
        assert_eq!(lines[2], "  rest    0/6 done: 0 ok, 0 failed, 0 timed out; 0 in flight");
    }

    #[test]
    fn the_conclusion_names_what_to_do_next() {
        let mixed: &[(&str, u64)] = &[("succeeded", 2), ("failed", 1)];
        let text = conclusion(&detail(RolloutState::Paused, &[("canary", mixed)]), exit::PAUSED, &[]);
        assert!(
            text.starts_with("rollout paused: wave \"canary\" over 25%\nresume it with: fleetpatch rollout resume"),
            "{text}"
        );
        assert!(text.contains("retry-failed"), "{text}");
        let text = conclusion(&detail(RolloutState::Completed, &[("all", mixed)]), exit::TARGETS_FAILED, &[]);
        assert!(text.starts_with("rollout completed, but 1 of 3 targets did not succeed (1 failed"), "{text}");
    }
}
