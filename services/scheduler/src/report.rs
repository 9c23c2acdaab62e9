//! The evidence report of a rollout ("prove what happened"): per target and
//! per patch, the state, exit code, timings and verification; who created,
//! approved, paused, resumed or aborted the rollout and when (from the audit
//! log); and the timeline of state changes. Rendered as JSON, CSV (one row
//! per target and patch) or one self-contained HTML file with a summary
//! chart (targets per state per wave over time, inline SVG, no script and
//! nothing fetched).
//!
//! The API stores the sha256 of every report it issues
//! (`Store::record_evidence`), so a copy can be checked later
//! (`GET /v1/reports/{sha256}`, `fleetpatch report verify FILE`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use fleetpatch_proto::state::TargetState;
use fleetpatch_runtime::text::is_bidi_control;
use fleetpatch_store::{AuditEntry, AuditQuery, Patch, Rollout, Store, Target, TargetPatch, Transition};
use serde::Serialize;
use uuid::Uuid;

/// The formats a report comes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Html,
}

impl Format {
    pub fn parse(raw: &str) -> Option<Format> {
        match raw {
            "json" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            "html" => Some(Format::Html),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Html => "html",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Html => "text/html; charset=utf-8",
        }
    }
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] fleetpatch_store::Error),
    #[error("writing the CSV report: {0}")]
    Csv(#[from] csv::Error),
    #[error("writing the JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

/// One target's account.
#[derive(Debug, Serialize)]
pub struct TargetAccount {
    #[serde(flatten)]
    pub target: Target,
    pub wave_name: String,
    pub patches: Vec<PatchAccount>,
}

/// One patch on one target.
#[derive(Debug, Serialize)]
pub struct PatchAccount {
    pub name: String,
    #[serde(flatten)]
    pub result: TargetPatch,
}

/// Everything a report says.
#[derive(Debug, Serialize)]
pub struct EvidenceReport {
    pub generated_at: DateTime<Utc>,
    pub generated_by: String,
    pub rollout: Rollout,
    pub patches: Vec<Patch>,
    /// Targets per final or current state, per wave name.
    pub summary: BTreeMap<String, BTreeMap<String, u64>>,
    pub targets: Vec<TargetAccount>,
    /// The rollout's audited calls (create, pause, resume, approve, abort,
    /// retry, and their refusals), oldest first.
    pub audit: Vec<AuditEntry>,
    /// Every state change of every target, oldest first.
    pub timeline: Vec<Transition>,
}

const PAGE: u64 = 10_000;

impl EvidenceReport {
    /// Reads everything about the rollout.
    pub async fn gather(
        store: &Store,
        rollout_id: Uuid,
        generated_by: &str,
        now: DateTime<Utc>,
    ) -> Result<EvidenceReport, ReportError> {
        let rollout = store.rollout(rollout_id).await?;
        let patches = store.patches(rollout_id).await?;
        let names: HashMap<u32, &str> = patches.iter().map(|p| (p.index, p.name.as_str())).collect();
        let mut rows: HashMap<Uuid, Vec<PatchAccount>> = HashMap::new();
        for (target, result) in store.rollout_target_patches(rollout_id).await? {
            let name = names.get(&result.patch_index).copied().unwrap_or_default().to_owned();
            rows.entry(target).or_default().push(PatchAccount { name, result });
        }
        let mut targets = Vec::new();
        let mut after = None;
        loop {
            let page = store.targets(rollout_id, None, after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.ordinal);
            let full = page.len() as u64 == PAGE;
            for target in page {
                let wave_name =
                    rollout.waves.get(target.wave as usize).map(|w| w.name.clone()).unwrap_or_else(|| "all".into());
                let patches = rows.remove(&target.id).unwrap_or_default();
                targets.push(TargetAccount { target, wave_name, patches });
            }
            if !full {
                break;
            }
        }
        let mut summary: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for account in &targets {
            *summary
                .entry(account.wave_name.clone())
                .or_default()
                .entry(account.target.state.as_str().to_owned())
                .or_default() += 1;
        }
        let mut audit = Vec::new();
        let mut before = None;
        loop {
            let page = store.audit_entries(AuditQuery { rollout_id: Some(rollout_id), before, limit: 1_000 }).await?;
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            let full = page.len() == 1_000;
            audit.extend(page);
            if !full {
                break;
            }
        }
        audit.reverse();
        let timeline = store.rollout_transitions(rollout_id).await?;
        Ok(EvidenceReport {
            generated_at: now,
            generated_by: generated_by.to_owned(),
            rollout,
            patches,
            summary,
            targets,
            audit,
            timeline,
        })
    }

    /// The summary's waves in the rollout's order (the map is by name).
    fn waves_in_order(&self) -> impl Iterator<Item = (&String, &BTreeMap<String, u64>)> {
        let names: Vec<&str> = self.rollout.waves.iter().map(|w| w.name.as_str()).collect();
        let rank = |name: &str| names.iter().position(|n| *n == name).unwrap_or(usize::MAX);
        let mut waves: Vec<_> = self.summary.iter().collect();
        waves.sort_by_key(|(name, _)| rank(name));
        waves.into_iter()
    }

    pub fn render(&self, format: Format) -> Result<Vec<u8>, ReportError> {
        match format {
            Format::Json => Ok(serde_json::to_vec_pretty(self)?),
            Format::Csv => self.csv(),
            Format::Html => Ok(self.html().into_bytes()),
        }
    }

    /// One row per target and patch (a target without patch rows, never
    /// probed, has one row with the patch columns empty).
    fn csv(&self) -> Result<Vec<u8>, ReportError> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.write_record([
            "rollout",
            "wave",
            "target_id",
            "host",
            "transport",
            "target_state",
            "attempt",
            "target_error",
            "queued_at",
            "running_at",
            "finished_at",
            "verified_state",
            "verified_at",
            "patch_index",
            "patch",
            "patch_state",
            "exit_code",
            "outcome",
            "reboot_required",
            "patch_started_at",
            "patch_finished_at",
            "patch_error",
        ])?;
        for account in &self.targets {
            let t = &account.target;
            let target_columns = [
                cell(&self.rollout.name),
                cell(&account.wave_name),
                t.id.to_string(),
                cell(&t.host),
                cell(&t.transport),
                t.state.as_str().to_owned(),
                t.attempt.to_string(),
                cell(t.error.as_deref().unwrap_or_default()),
                rfc3339(&t.queued_at),
                rfc3339(&t.running_at),
                rfc3339(&t.finished_at),
                cell(t.verified_state.as_deref().unwrap_or_default()),
                rfc3339(&t.verified_at),
            ];
            if account.patches.is_empty() {
                let mut row = target_columns.to_vec();
                row.extend(std::iter::repeat_n(String::new(), 9));
                writer.write_record(&row)?;
            }
            for patch in &account.patches {
                let p = &patch.result;
                let mut row = target_columns.to_vec();
                row.extend([
                    p.patch_index.to_string(),
                    cell(&patch.name),
                    p.state.as_str().to_owned(),
                    p.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                    cell(p.outcome.as_deref().unwrap_or_default()),
                    p.reboot_required.to_string(),
                    rfc3339(&p.started_at),
                    rfc3339(&p.finished_at),
                    cell(p.error.as_deref().unwrap_or_default()),
                ]);
                writer.write_record(&row)?;
            }
        }
        writer.into_inner().map_err(|error| ReportError::Csv(error.into_error().into()))
    }

    fn html(&self) -> String {
        let r = &self.rollout;
        let mut out = String::with_capacity(4096 + self.targets.len() * 400);
        let _ = write!(
            out,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>fleetpatch evidence: {name}</title><style>{STYLE}</style></head><body>\n\
             <h1>Rollout {name}</h1>\n<p class=\"meta\">id {id} · state <b>{state}</b> · created {created} · \
             completed {completed} · report generated {generated} by {by}</p>\n",
            name = esc(&r.name),
            id = r.id,
            state = r.state,
            created = r.created_at.to_rfc3339(),
            completed = r.completed_at.map(|at| at.to_rfc3339()).unwrap_or_else(|| "—".into()),
            generated = self.generated_at.to_rfc3339(),
            by = esc(&self.generated_by),
        );
        out.push_str("<h2>Summary</h2>\n<table><tr><th>wave</th>");
        let states: Vec<&str> = TargetState::ALL.iter().map(|s| s.as_str()).collect();
        for state in &states {
            let _ = write!(out, "<th>{state}</th>");
        }
        out.push_str("</tr>\n");
        for (wave, counts) in self.waves_in_order() {
            let _ = write!(out, "<tr><td>{}</td>", esc(wave));
            for state in &states {
                let _ = write!(out, "<td>{}</td>", counts.get(*state).copied().unwrap_or(0));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n<h2>Targets per state per wave over time</h2>\n");
        out.push_str(&self.chart());
        out.push_str("<h2>Who did what</h2>\n<table><tr><th>at</th><th>actor</th><th>kind</th><th>role</th><th>call</th><th>status</th><th>from</th></tr>\n");
        for entry in &self.audit {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td></tr>",
                entry.at.to_rfc3339(),
                esc(&entry.actor),
                entry.actor_kind.as_str(),
                entry.role.as_str(),
                esc(&entry.method),
                esc(&entry.route),
                entry.status,
                esc(&entry.source),
            );
        }
        out.push_str("</table>\n<h2>Targets and patches</h2>\n<table><tr><th>wave</th><th>host</th><th>state</th><th>attempt</th><th>patch</th><th>patch state</th><th>exit code</th><th>reboot</th><th>started</th><th>finished</th><th>verification</th><th>error</th></tr>\n");
        for account in &self.targets {
            let t = &account.target;
            let target_cells = format!(
                "<td>{}</td><td>{}</td><td class=\"{state}\">{state}</td><td>{}</td>",
                esc(&account.wave_name),
                esc(&t.host),
                t.attempt,
                state = t.state.as_str(),
            );
            let verified = match (&t.verified_state, &t.verified_at) {
                (Some(state), Some(at)) => format!("{} at {}", esc(state), at.to_rfc3339()),
                _ => String::new(),
            };
            // A target never probed has no patch rows: one row with its error.
            let no_patches = [None];
            let patches: Vec<Option<&PatchAccount>> = if account.patches.is_empty() {
                no_patches.to_vec()
            } else {
                account.patches.iter().map(Some).collect()
            };
            for patch in patches {
                let patch_cells = match patch {
                    None => "<td colspan=\"6\"></td>".to_owned(),
                    Some(patch) => {
                        let p = &patch.result;
                        format!(
                            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
                            esc(&patch.name),
                            p.state.as_str(),
                            p.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                            if p.reboot_required { "required" } else { "" },
                            rfc3339(&p.started_at),
                            rfc3339(&p.finished_at),
                        )
                    }
                };
                let error = patch.and_then(|p| p.result.error.as_deref()).or(t.error.as_deref()).unwrap_or("");
                let _ = writeln!(out, "<tr>{target_cells}{patch_cells}<td>{verified}</td><td>{}</td></tr>", esc(error));
            }
        }
        let _ = write!(
            out,
            "</table>\n<p class=\"meta\">{} state changes recorded; the JSON report holds each of them.</p>\n</body></html>\n",
            self.timeline.len()
        );
        out
    }

    /// One stacked bar chart per wave: at 24 moments from the rollout's
    /// creation to its last state change, how many of the wave's targets
    /// were in each state.
    fn chart(&self) -> String {
        const SAMPLES: usize = 24;
        const WIDTH: f64 = 720.0;
        const HEIGHT: f64 = 120.0;
        let start = self.rollout.created_at;
        let end = self.timeline.last().map(|t| t.at).unwrap_or(start).max(start + chrono::Duration::seconds(1));
        let span = (end - start).num_milliseconds().max(1) as f64;
        let wave_of: HashMap<Uuid, &str> = self.targets.iter().map(|a| (a.target.id, a.wave_name.as_str())).collect();
        let mut out = String::new();
        for (wave, counts) in self.waves_in_order() {
            let size: u64 = counts.values().sum();
            let mut state_of: HashMap<Uuid, &str> = HashMap::new();
            let mut changes =
                self.timeline.iter().filter(|t| wave_of.get(&t.target_id) == Some(&wave.as_str())).peekable();
            let _ = write!(
                out,
                "<figure><figcaption>{} ({size} targets)</figcaption><svg \
                 width=\"{WIDTH}\" height=\"{}\" role=\"img\">",
                esc(wave),
                HEIGHT + 16.0
            );
            let bar = WIDTH / SAMPLES as f64;
            for sample in 0..SAMPLES {
                let at = start + chrono::Duration::milliseconds((span * (sample + 1) as f64 / SAMPLES as f64) as i64);
                while let Some(change) = changes.next_if(|t| t.at <= at) {
                    state_of.insert(change.target_id, change.to.as_str());
                }
                let mut per_state: BTreeMap<&str, u64> = BTreeMap::new();
                for state in state_of.values() {
                    *per_state.entry(state).or_default() += 1;
                }
                let pending = size.saturating_sub(state_of.len() as u64);
                let mut y = HEIGHT;
                for (state, count) in std::iter::once(("pending", pending)).chain(per_state) {
                    if count == 0 || size == 0 {
                        continue;
                    }
                    let h = HEIGHT * count as f64 / size as f64;
                    y -= h;
                    let _ = write!(
                        out,
                        "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{} {state}: {count}</title></rect>",
                        sample as f64 * bar,
                        bar - 2.0,
                        colour(state),
                        at.to_rfc3339(),
                    );
                }
            }
            let _ = writeln!(
                out,
                "<text x=\"0\" y=\"{y}\" font-size=\"11\">{}</text><text x=\"{WIDTH}\" y=\"{y}\" font-size=\"11\" \
                 text-anchor=\"end\">{}</text></svg></figure>",
                start.to_rfc3339(),
                end.to_rfc3339(),
                y = HEIGHT + 13.0
            );
        }
        out.push_str("<p class=\"legend\">");
        for state in [
            "pending",
            "queued",
            "probing",
            "staging",
            "installing",
            "running",
            "succeeded",
            "failed",
            "timed_out",
            "cancelled",
            "missed_window",
            "offline",
            "rebooting",
        ] {
            let _ = write!(out, "<span style=\"background:{}\">&nbsp;&nbsp;</span> {state} ", colour(state));
        }
        out.push_str("</p>\n");
        out
    }
}

/// A moment as RFC 3339, or nothing.
fn rfc3339(at: &Option<DateTime<Utc>>) -> String {
    at.map(|at| at.to_rfc3339()).unwrap_or_default()
}

fn colour(state: &str) -> &'static str {
    match state {
        "succeeded" => "#2e7d32",
        "failed" => "#c62828",
        "timed_out" => "#ef6c00",
        "cancelled" => "#757575",
        "missed_window" => "#9e9e9e",
        "offline" => "#6a1b9a",
        "rebooting" => "#00838f",
        "pending" => "#e0e0e0",
        _ => "#1565c0",
    }
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}\
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}.meta{color:#555}\
.succeeded{color:#2e7d32}.failed{color:#c62828}.timed_out{color:#ef6c00}figure{margin:1em 0}";

/// Text from targets and callers in a CSV cell, made inert in a
/// spreadsheet: control characters (but newlines) and bidirectional
/// overrides are dropped, and a cell that would start a formula (`=`, `+`,
/// `-`, `@`) gets a leading `'` (OWASP's advice on CSV injection).
pub fn cell(text: &str) -> String {
    let clean: String = text.chars().filter(|&c| (c == '\n' || !c.is_control()) && !is_bidi_control(c)).collect();
    if clean.starts_with(['=', '+', '-', '@']) {
        format!("'{clean}")
    } else {
        clean
    }
}

/// Text from targets and callers, made inert in HTML: markup escaped,
/// control and bidirectional-override characters dropped.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() || is_bidi_control(c) => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_inert_in_html() {
        assert_eq!(esc("<script>alert('x')</script>"), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;");
        assert_eq!(esc("host\u{202e}gpj.exe\u{7}"), "hostgpj.exe");
        assert_eq!(esc("a & \"b\""), "a &amp; &quot;b&quot;");
    }

    #[test]
    fn hostile_text_is_inert_in_a_spreadsheet() {
        assert_eq!(cell("=HYPERLINK(\"http://x\")"), "'=HYPERLINK(\"http://x\")");
        assert_eq!(cell("@SUM(1)"), "'@SUM(1)");
        assert_eq!(cell("-2+3"), "'-2+3");
        assert_eq!(cell("web01\u{202e}"), "web01");
        assert_eq!(cell("\t=cmd"), "'=cmd", "a leading tab does not hide a formula");
        assert_eq!(cell("ok"), "ok");
    }

    #[test]
    fn formats_are_named() {
        for format in [Format::Json, Format::Csv, Format::Html] {
            assert_eq!(Format::parse(format.as_str()), Some(format));
        }
        assert_eq!(Format::parse("pdf"), None);
    }
}
