//! `rollout create | list | show | pause | resume | approve | abort | retry-failed`.

use uuid::Uuid;

use super::{refused_fields, CreateArgs};
use crate::client::{ApiClient, ClientError, RolloutAction, RolloutDetail, RolloutView};
use crate::exit::{self, Failure};
use crate::inventory;
use crate::output::{self, Counts, OutputFormat, Table};
use crate::rollout_file::{self, RolloutInput};

/// Reads the rollout file and the imported targets into one request.
pub fn read_input(args: &CreateArgs) -> Result<RolloutInput, Failure> {
    let file = args.file.display().to_string();
    let text = rollout_file::read_input(&args.file)?;
    let imports = !args.targets_csv.is_empty() || !args.inventory.is_empty();
    let request = rollout_file::parse(&text, &file, imports)?;
    let mut input = RolloutInput::new(request, &file);
    for path in &args.targets_csv {
        let text = rollout_file::read_input(path)?;
        let transport = args.transport.as_deref().unwrap_or("sim");
        input.merge(inventory::parse_csv(&text, &path.display().to_string(), transport)?)?;
    }
    for path in &args.inventory {
        let text = rollout_file::read_input(path)?;
        let transport = args.transport.as_deref().unwrap_or("ssh");
        input.merge(inventory::parse_inventory(&text, &path.display().to_string(), transport)?)?;
    }
    Ok(input)
}

pub async fn create(api: &ApiClient, args: CreateArgs, environment: &crate::check::Environment) -> Result<u8, Failure> {
    let input = read_input(&args)?;
    if args.preflight {
        let bytes = crate::check::patch_bytes(&input.request);
        let mut reports = crate::check::check_targets(environment, &input.request.targets, bytes).await;
        for (report, origin) in reports.iter_mut().zip(&input.origins) {
            report.origin = Some(origin.clone());
        }
        let failed = reports.iter().filter(|r| !r.ok).count();
        if failed > 0 {
            // The report goes to stderr: stdout stays for the created rollout.
            eprint!("{}", crate::check::render_table(&reports));
            return Err(Failure::new(
                exit::CHECK_FAILED,
                format!(
                    "preflight failed on {failed} of {} targets; no rollout was created (fix them, or leave out                      --preflight)",
                    reports.len()
                ),
            ));
        }
        eprintln!("preflight passed on all {} targets", reports.len());
    }
    if args.dry_run {
        let request = serde_json::to_value(&input.request).map_err(|e| Failure::new(exit::ERROR, e.to_string()))?;
        println!("{}", output::json(&request));
        eprintln!(
            "dry run: {} is valid here ({} targets, {} patches); nothing was sent, and the API checks more \
             (e.g. that installers were uploaded)",
            args.file.display(),
            input.request.targets.len(),
            input.request.patches.len()
        );
        return Ok(exit::OK);
    }
    let created = match api.create_rollout(&input.request).await {
        Ok(created) => created,
        Err(ClientError::Refused { problem, .. }) if !problem.errors.is_empty() => {
            let message = refused_fields(&problem, |field| {
                input.origin_of(field).or_else(|| Some(args.file.to_str().unwrap_or("the rollout file")))
            });
            return Err(Failure::new(exit::INVALID, message));
        }
        Err(error) => return Err(error.into()),
    };
    let rollout: RolloutView = api.view("/v1/rollouts", &created)?;
    match args.output.output {
        OutputFormat::Json => println!("{}", output::json(&created)),
        OutputFormat::Table => {
            println!(
                "created rollout {} {:?}: {} targets, {} patches, {} wave{}",
                rollout.id,
                rollout.name,
                input.request.targets.len(),
                input.request.patches.len(),
                rollout.waves.len(),
                if rollout.waves.len() == 1 { "" } else { "s" }
            );
            if !args.watch {
                println!("watch it: fleetpatch rollout watch {}", rollout.id);
            }
        }
    }
    if args.watch {
        let interval = std::time::Duration::from_secs(1);
        return super::watch::watch(api, rollout.id, interval, args.output.output).await;
    }
    Ok(exit::OK)
}

pub async fn list(api: &ApiClient, limit: u64, format: OutputFormat) -> Result<u8, Failure> {
    let raw = api.list_rollouts(limit).await?;
    if format == OutputFormat::Json {
        println!("{}", output::json(&raw));
        return Ok(exit::OK);
    }
    #[derive(serde::Deserialize)]
    struct List {
        rollouts: Vec<RolloutView>,
    }
    let list: List = api.view("/v1/rollouts", &raw)?;
    if list.rollouts.is_empty() {
        println!("no rollouts yet; create one: fleetpatch rollout create -f rollout.yaml");
        return Ok(exit::OK);
    }
    print!("{}", rollouts_table(&list.rollouts));
    Ok(exit::OK)
}

pub fn rollouts_table(rollouts: &[RolloutView]) -> Table {
    let mut table = Table::new(&["ID", "NAME", "STATE", "WAVE", "CREATED", "COMPLETED"]);
    for rollout in rollouts {
        let wave = match rollout.waves.get(rollout.current_wave as usize) {
            Some(wave) => format!("{}/{} {}", rollout.current_wave + 1, rollout.waves.len(), wave.name),
            None => "-".into(),
        };
        table.push(vec![
            rollout.id.to_string(),
            output::truncate(&rollout.name, 40),
            rollout.state.to_string(),
            wave,
            output::time(rollout.created_at),
            output::optional_time(rollout.completed_at),
        ]);
    }
    table
}

pub async fn show(api: &ApiClient, id: Uuid, format: OutputFormat) -> Result<u8, Failure> {
    let (raw, detail) = api.rollout_detail(id).await?;
    match format {
        OutputFormat::Json => println!("{}", output::json(&raw)),
        OutputFormat::Table => print!("{}", render_detail(&detail)),
    }
    Ok(exit::OK)
}

/// `rollout show`: the rollout, a table of its waves, a table of its patches.
pub fn render_detail(detail: &RolloutDetail) -> String {
    let rollout = &detail.rollout;
    let mut out = String::new();
    out.push_str(&format!("rollout     {} {:?}\n", rollout.id, output::clean(&rollout.name)));
    out.push_str(&format!("state       {}", rollout.state));
    if let Some(reason) = &rollout.pause_reason {
        out.push_str(&format!(" ({})", output::clean(reason)));
    }
    out.push('\n');
    out.push_str(&format!("settings    concurrency {}, timeout {} s\n", rollout.concurrency, rollout.timeout_seconds));
    out.push_str(&format!("created     {}\n", output::time(rollout.created_at)));
    if let Some(completed) = rollout.completed_at {
        let took = output::duration(completed - rollout.created_at);
        out.push_str(&format!("completed   {} (after {took})\n", output::time(completed)));
    }
    let overall = Counts::from_states(detail.progress.total, &detail.progress.by_state);
    out.push_str(&format!("targets     {}\n\n", overall.summary()));
    let mut waves = Table::new(&[
        "WAVE",
        "NAME",
        "TARGETS",
        "PENDING",
        "IN FLIGHT",
        "OFFLINE",
        "SUCCEEDED",
        "FAILED",
        "TIMED OUT",
        "CANCELLED",
        "MISSED",
        "MAX FAIL",
    ]);
    for column in 2..=10 {
        waves = waves.right(column);
    }
    for wave in &detail.progress.waves {
        let counts = Counts::from_states(wave.total, &wave.by_state);
        let current = if wave.index == rollout.current_wave { "▸" } else { " " };
        let max_failure = rollout.waves.get(wave.index as usize).map(|w| format!("{}%", w.max_failure_percent));
        waves.push(vec![
            format!("{current}{}", wave.index + 1),
            wave.name.clone(),
            counts.total.to_string(),
            counts.pending.to_string(),
            counts.in_flight.to_string(),
            counts.offline.to_string(),
            counts.succeeded.to_string(),
            counts.failed.to_string(),
            counts.timed_out.to_string(),
            counts.cancelled.to_string(),
            counts.missed_window.to_string(),
            max_failure.unwrap_or_default(),
        ]);
    }
    out.push_str(&waves.to_string());
    if !detail.patches.is_empty() {
        out.push('\n');
        let mut patches = Table::new(&["#", "PATCH", "KB", "INSTALLER", "FILE", "SHA256"]).right(0);
        for patch in &detail.patches {
            patches.push(vec![
                patch.index.to_string(),
                patch.name.clone(),
                patch.kb.clone().unwrap_or_else(|| "-".into()),
                patch.installer.clone(),
                patch.file.clone(),
                format!("{}…", patch.sha256.chars().take(12).collect::<String>()),
            ]);
        }
        out.push_str(&patches.to_string());
    }
    out
}

pub async fn act(
    api: &ApiClient,
    id: Uuid,
    action: RolloutAction,
    reason: Option<String>,
    format: OutputFormat,
) -> Result<u8, Failure> {
    let raw = api.rollout_action(id, action, reason.as_deref()).await?;
    if format == OutputFormat::Json {
        println!("{}", output::json(&raw));
        return Ok(exit::OK);
    }
    if action == RolloutAction::RetryFailed {
        let retried = raw["retried"].as_u64().unwrap_or(0);
        println!("{retried} failed or timed-out target(s) of rollout {id} will be tried again");
        if retried > 0 {
            println!("watch it: fleetpatch rollout watch {id}");
        }
        return Ok(exit::OK);
    }
    let rollout: RolloutView = api.view(&format!("/v1/rollouts/{id}/{}", action.slug()), &raw)?;
    let mut line = format!("rollout {} {:?} is {}", rollout.id, output::clean(&rollout.name), rollout.state);
    if let Some(reason) = &rollout.pause_reason {
        line.push_str(&format!(" ({})", output::clean(reason)));
    }
    println!("{line}");
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{PatchView, ProgressView, WaveProgressView, WaveView};
    use fleetpatch_proto::state::RolloutState;

    fn detail() -> RolloutDetail {
        let at = "2024-05-01T10:00:00Z".parse().unwrap();
        RolloutDetail {
            rollout: RolloutView {
                id: Uuid::nil(),
                name: "patch-tuesday".into(),
                state: RolloutState::Paused,
                pause_reason: Some("wave \"canary\": 2 of 4 failed".into()),
                current_wave: 0,
                concurrency: 4,
                timeout_seconds: 600,
                waves: vec![
                    WaveView { name: "canary".into(), size: Some(4), max_failure_percent: 25.0, ..Default::default() },
                    WaveView { name: "rest".into(), size: None, max_failure_percent: 100.0, ..Default::default() },
                ],
                created_at: at,
                completed_at: None,
            },
            progress: ProgressView {
                total: 10,
                by_state: [("succeeded".to_owned(), 2), ("failed".to_owned(), 2), ("pending".to_owned(), 6)].into(),
                waves: vec![
                    WaveProgressView {
                        index: 0,
                        name: "canary".into(),
                        total: 4,
                        by_state: [("succeeded".to_owned(), 2), ("failed".to_owned(), 2)].into(),
                    },
                    WaveProgressView {
                        index: 1,
                        name: "rest".into(),
                        total: 6,
                        by_state: [("pending".to_owned(), 6)].into(),
                    },
                ],
            },
            patches: vec![PatchView {
                index: 0,
                name: "KB5031356".into(),
                kb: Some("KB5031356".into()),
                file: "kb.msu".into(),
                sha256: "1".repeat(64),
                installer: "msu".into(),
            }],
        }
    }

    #[test]
    fn show_renders_waves_and_patches_as_tables() {
        let text = render_detail(&detail());
        assert!(text.contains("state       paused (wave \"canary\": 2 of 4 failed)"), "{text}");
        assert!(text.contains("targets     4/10 done: 2 ok, 2 failed, 0 timed out; 0 in flight"), "{text}");
        let waves: Vec<&str> = text.lines().filter(|l| l.contains("canary") || l.contains("rest")).collect();
        assert!(waves.iter().any(|l| l.starts_with("▸1    canary")), "{text}");
        assert!(
            waves.iter().any(|l| l.starts_with(" 2    rest          6        6") && l.ends_with("0  100%")),
            "{text}"
        );
        assert!(text.contains("0  KB5031356  KB5031356  msu        kb.msu  111111111111…"), "{text}");
    }

    #[test]
    fn the_rollouts_table_shows_the_current_wave() {
        let table = rollouts_table(&[detail().rollout]).to_string();
        let row = table.lines().nth(1).unwrap();
        assert!(row.starts_with("00000000-0000-0000-0000-000000000000  patch-tuesday  paused  1/2 canary"), "{row}");
    }
}
