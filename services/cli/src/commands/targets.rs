//! `targets ROLLOUT` (a paged table) and `target ID` (patches and timeline).

use std::collections::BTreeMap;
use std::io::Write;

use chrono::{DateTime, Utc};
use fleetpatch_proto::state::TargetState;
use uuid::Uuid;

use crate::client::{ApiClient, RolloutDetail, TargetDetail, TargetView};
use crate::exit::{self, Failure};
use crate::output::{self, OutputFormat, Table};

/// Targets asked for per request.
const PAGE: u64 = 1_000;

fn targets_table() -> Table {
    Table::new(&["ID", "HOST", "TRANSPORT", "WAVE", "STATE", "ATTEMPT", "LAST SEEN", "ERROR"]).right(5)
}

fn target_row(target: &TargetView, wave_names: &BTreeMap<u32, String>) -> Vec<String> {
    let host = match target.port {
        Some(port) => format!("{}:{port}", target.host),
        None => target.host.clone(),
    };
    let mut state = target.state.to_string();
    if let Some(verified) = &target.verified_state {
        state.push_str(&format!(" (verified: {verified})"));
    }
    vec![
        target.id.to_string(),
        host,
        target.transport.clone(),
        wave_names.get(&target.wave).cloned().unwrap_or_else(|| target.wave.to_string()),
        state,
        target.attempt.to_string(),
        output::optional_time(target.last_seen_at),
        target.error.as_deref().map(|e| output::truncate(e, 80)).unwrap_or_default(),
    ]
}

/// Pages through `GET /v1/rollouts/{id}/targets` with `next_after`,
/// printing each page as it arrives (a table keeps the first page's
/// widths; JSON is one document `{"targets": [...], "next_after": null}`).
pub async fn list(
    api: &ApiClient,
    id: Uuid,
    state: Option<TargetState>,
    limit: Option<u64>,
    format: OutputFormat,
) -> Result<u8, Failure> {
    let (_, rollout): (_, RolloutDetail) = api.rollout_detail(id).await?;
    let wave_names: BTreeMap<u32, String> =
        rollout.rollout.waves.iter().enumerate().map(|(i, w)| (i as u32, w.name.clone())).collect();
    let mut stdout = std::io::stdout().lock();
    let mut table = targets_table();
    let mut widths: Option<Vec<usize>> = None;
    let mut after = None;
    let mut shown: u64 = 0;
    let io = |e: std::io::Error| Failure::new(exit::ERROR, format!("writing the output: {e}"));
    if format == OutputFormat::Json {
        write!(stdout, "{{\"targets\": [").map_err(io)?;
    }
    loop {
        let want = limit.map_or(PAGE, |limit| (limit - shown).min(PAGE));
        if want == 0 {
            break;
        }
        let page = api.targets_page(id, state, after, want).await?;
        for raw in &page.targets {
            if format == OutputFormat::Json {
                let separator = if shown == 0 { "\n" } else { ",\n" };
                write!(stdout, "{separator}{}", serde_json::to_string(raw).unwrap_or_default()).map_err(io)?;
            } else {
                let target: TargetView = api.view(&format!("/v1/rollouts/{id}/targets"), raw)?;
                table.push(target_row(&target, &wave_names));
            }
            shown += 1;
        }
        if format == OutputFormat::Table && !table.is_empty() {
            let header = widths.is_none();
            let widths = widths.get_or_insert_with(|| table.widths());
            stdout.write_all(table.render(header, widths).as_bytes()).map_err(io)?;
            table.clear();
        }
        match page.next_after {
            Some(next) if !page.targets.is_empty() => after = Some(next),
            _ => break,
        }
    }
    if format == OutputFormat::Json {
        writeln!(stdout, "\n], \"next_after\": null}}").map_err(io)?;
    } else if shown == 0 {
        let which = state.map(|s| format!(" in state {s}")).unwrap_or_default();
        writeln!(stdout, "rollout {id} has no targets{which}").map_err(io)?;
    }
    Ok(exit::OK)
}

pub async fn show(api: &ApiClient, id: Uuid, format: OutputFormat) -> Result<u8, Failure> {
    let raw = api.target(id).await?;
    if format == OutputFormat::Json {
        println!("{}", output::json(&raw));
        return Ok(exit::OK);
    }
    let detail: TargetDetail = api.view(&format!("/v1/targets/{id}"), &raw)?;
    print!("{}", render_target(&detail));
    Ok(exit::OK)
}

/// One line of a target's timeline.
struct Moment {
    at: DateTime<Utc>,
    what: String,
}

/// `target ID`: the target, its patches, and one timeline of its state
/// changes and its agent's reports.
pub fn render_target(detail: &TargetDetail) -> String {
    let target = &detail.target;
    let mut out = String::new();
    let host = match target.port {
        Some(port) => format!("{}:{port}", target.host),
        None => target.host.clone(),
    };
    out.push_str(&format!("target      {} {}\n", target.id, output::clean(&host)));
    out.push_str(&format!("rollout     {} (wave {})\n", target.rollout_id, target.wave + 1));
    out.push_str(&format!("transport   {}\n", target.transport));
    out.push_str(&format!("state       {} (attempt {}, {} tries)\n", target.state, target.attempt, target.tries));
    if let Some(verified) = &target.verified_state {
        out.push_str(&format!("verified    {}\n", output::clean(verified)));
    }
    if target.os.is_some() || target.arch.is_some() {
        let os = target.os.as_deref().unwrap_or("?");
        let arch = target.arch.as_deref().unwrap_or("?");
        out.push_str(&format!("system      {} {}\n", output::clean(os), output::clean(arch)));
    }
    if !target.labels.is_empty() {
        let labels: Vec<String> = target.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("labels      {}\n", output::clean(&labels.join(" "))));
    }
    if let Some(delivery) = &target.delivery {
        out.push_str(&format!("delivery    {}\n", output::clean(delivery)));
    }
    if let Some(error) = &target.error {
        out.push_str(&format!("error       {}\n", output::clean(error)));
    }
    out.push('\n');
    let mut patches =
        Table::new(&["#", "PATCH", "STATE", "EXIT", "REBOOT", "TOOK", "ERROR / OUTPUT"]).right(0).right(3);
    for patch in &detail.patches {
        let took = match (patch.started_at, patch.finished_at) {
            (Some(start), Some(end)) => output::duration(end - start),
            _ => "-".into(),
        };
        let note = patch.error.as_deref().or(patch.output_tail.as_deref()).unwrap_or_default();
        let last_line = note.trim_end().lines().last().unwrap_or_default();
        patches.push(vec![
            patch.patch_index.to_string(),
            patch.name.clone(),
            patch.outcome.clone().unwrap_or_else(|| patch.state.as_str().to_owned()),
            patch.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            if patch.reboot_required { "yes".into() } else { "-".into() },
            took,
            output::truncate(last_line, 80),
        ]);
    }
    if patches.is_empty() {
        out.push_str("no patch results yet\n");
    } else {
        out.push_str(&patches.to_string());
    }
    let names: BTreeMap<u32, &str> = detail.patches.iter().map(|p| (p.patch_index, p.name.as_str())).collect();
    let mut moments: Vec<Moment> = detail
        .transitions
        .iter()
        .map(|t| {
            let mut what = format!("{} → {}", t.from, t.to);
            if let Some(detail) = &t.detail {
                what.push_str(&format!("  {}", output::truncate(detail, 100)));
            }
            Moment { at: t.at, what }
        })
        .collect();
    // The agent processes of each attempt, in the order they first
    // reported: more than one means the deployment's agent ran again (a
    // restart on the host, or a second start), and each run is shown.
    let mut runs: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for event in &detail.events {
        let instances = runs.entry(event.attempt).or_default();
        if !instances.contains(&event.agent_instance.as_str()) {
            instances.push(&event.agent_instance);
        }
    }
    for event in &detail.events {
        if event.kind == "heartbeat" {
            continue;
        }
        let instances = &runs[&event.attempt];
        let mut what = if instances.len() > 1 {
            let run = instances.iter().position(|i| *i == event.agent_instance).unwrap_or(0) + 1;
            format!("agent run {run}/{} ({}): {}", instances.len(), event.agent_instance, event.kind)
        } else {
            format!("agent: {}", event.kind)
        };
        if let Some(index) = event.patch_index {
            what.push_str(&format!(" {}", names.get(&index).copied().unwrap_or("?")));
        }
        if let Some(code) = event.exit_code {
            what.push_str(&format!(" (exit {code})"));
        }
        if let Some(detail) = &event.detail {
            what.push_str(&format!("  {}", output::truncate(detail, 100)));
        }
        moments.push(Moment { at: event.received_at, what });
    }
    // Counted per agent run by the collector; a server that keeps every
    // heartbeat as an event counts them in its summaries too.
    let heartbeats = if detail.heartbeats.is_empty() {
        detail.events.iter().filter(|e| e.kind == "heartbeat").count() as u64
    } else {
        detail.heartbeats.iter().map(|h| h.count).sum()
    };
    let last_heartbeat = detail.heartbeats.iter().map(|h| h.last_received_at).max();
    moments.sort_by_key(|m| m.at);
    out.push_str("\ntimeline\n");
    let Some(first) = moments.first().map(|m| m.at) else {
        out.push_str("  nothing happened yet\n");
        return out;
    };
    out.push_str(&format!("  {}  start\n", output::time(first)));
    for moment in &moments {
        out.push_str(&format!("  {:>10}  {}\n", format!("+{}", output::duration(moment.at - first)), moment.what));
    }
    if heartbeats > 0 {
        let last = last_heartbeat.map(|last| format!(", the last at +{}", output::duration(last - first)));
        out.push_str(&format!("  ({heartbeats} heartbeats not shown{})\n", last.unwrap_or_default()));
    }
    for (attempt, instances) in runs.iter().filter(|(_, instances)| instances.len() > 1) {
        out.push_str(&format!(
            "  attempt {attempt}: the agent ran {} times ({}); each run's reports are listed\n",
            instances.len(),
            instances.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{AgentEventView, HeartbeatView, TargetPatchView, TransitionView};
    use fleetpatch_proto::state::PatchState;

    fn at(ms: i64) -> DateTime<Utc> {
        "2024-05-01T10:00:00Z".parse::<DateTime<Utc>>().unwrap() + chrono::TimeDelta::milliseconds(ms)
    }

    fn target(state: TargetState) -> TargetView {
        TargetView {
            id: Uuid::nil(),
            rollout_id: Uuid::nil(),
            ordinal: 0,
            host: "web-01".into(),
            port: Some(2222),
            transport: "ssh".into(),
            labels: [("group".to_owned(), "web".to_owned())].into(),
            wave: 1,
            state,
            attempt: 1,
            tries: 1,
            last_seen_at: None,
            error: Some("KB2 failed with exit code 1603\nmore".into()),
            os: Some("linux".into()),
            arch: Some("x86_64".into()),
            queued_at: None,
            running_at: None,
            finished_at: None,
            verified_state: None,
            delivery: Some("relay http://relay-paris:1073".into()),
        }
    }

    #[test]
    fn a_target_row_names_its_wave_and_keeps_errors_on_one_line() {
        let waves = [(0, "canary".to_owned()), (1, "rest".to_owned())].into();
        let row = target_row(&target(TargetState::Failed), &waves);
        assert_eq!(row[1..6], ["web-01:2222", "ssh", "rest", "failed", "1"]);
        let mut table = targets_table();
        table.push(row);
        assert!(table.to_string().contains("KB2 failed with exit code 1603 more"), "{table}");
    }

    #[test]
    fn a_target_shows_patches_and_one_timeline() {
        let patch = |index: u32, name: &str, state: PatchState, exit_code: Option<i32>| TargetPatchView {
            patch_index: index,
            name: name.into(),
            state,
            exit_code,
            outcome: None,
            reboot_required: exit_code == Some(3010),
            output_tail: Some("line 1\nInstalled.\n".into()),
            error: None,
            started_at: Some(at(1_000)),
            finished_at: Some(at(3_500)),
        };
        let transition = |from: &str, to: &str, ms: i64| TransitionView {
            from: from.into(),
            to: to.into(),
            at: at(ms),
            detail: None,
        };
        let event = |seq: u64, kind: &str, patch_index: Option<u32>, exit_code: Option<i32>, ms: i64| AgentEventView {
            attempt: 1,
            agent_instance: "00000000000000aa".into(),
            seq,
            kind: kind.into(),
            patch_index,
            exit_code,
            detail: None,
            received_at: at(ms),
        };
        let detail = TargetDetail {
            target: target(TargetState::Succeeded),
            patches: vec![patch(0, "KB1", PatchState::Succeeded, Some(3010))],
            transitions: vec![transition("pending", "queued", 0), transition("running", "succeeded", 4_000)],
            events: vec![
                event(1, "started", Some(0), None, 1_000),
                event(2, "heartbeat", None, None, 2_000),
                event(3, "finished", Some(0), Some(3010), 3_500),
            ],
            heartbeats: vec![],
        };
        let text = render_target(&detail);
        assert!(text.contains("state       succeeded (attempt 1, 1 tries)"), "{text}");
        assert!(text.contains("delivery    relay http://relay-paris:1073\n"), "{text}");
        assert!(text.contains("0  KB1    succeeded  3010  yes     2.5s  Installed."), "{text}");
        let timeline: Vec<&str> = text.lines().skip_while(|l| *l != "timeline").skip(2).collect();
        assert_eq!(
            timeline,
            vec![
                "        +0ms  pending → queued",
                "       +1.0s  agent: started KB1",
                "       +3.5s  agent: finished KB1 (exit 3010)",
                "       +4.0s  running → succeeded",
                "  (1 heartbeats not shown)",
            ]
        );

        // A collector that counts heartbeats per agent run: the count of
        // every run and the time of the last one.
        let mut counted = detail.clone();
        counted.events.retain(|e| e.kind != "heartbeat");
        let run = |instance: &str, count, last_ms| HeartbeatView {
            attempt: 1,
            agent_instance: instance.into(),
            count,
            last_seq: count + 1,
            patch_index: Some(0),
            first_received_at: at(1_500),
            last_received_at: at(last_ms),
        };
        counted.heartbeats = vec![run("00000000000000aa", 5, 3_000), run("00000000000000bb", 2, 2_000)];
        let text = render_target(&counted);
        assert!(text.ends_with("  (7 heartbeats not shown, the last at +3.0s)\n"), "{text}");

        // A second agent process in the same attempt numbers from 1 again:
        // both runs are shown as such, never folded into one.
        let mut twice = detail.clone();
        let mut again = event(1, "started", Some(0), None, 3_600);
        again.agent_instance = "00000000000000bb".into();
        twice.events.push(again);
        let text = render_target(&twice);
        assert!(text.contains("+1.0s  agent run 1/2 (00000000000000aa): started KB1"), "{text}");
        assert!(text.contains("+3.6s  agent run 2/2 (00000000000000bb): started KB1"), "{text}");
        assert!(text.contains("attempt 1: the agent ran 2 times (00000000000000aa, 00000000000000bb)"), "{text}");
    }
}
