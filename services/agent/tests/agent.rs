//! End-to-end tests of the real `fleetpatch-agent` binary: real `/bin/sh`
//! installers, a real TCP collector that decodes the protobuf batches, real
//! process kills. Unix only (the installers are shell scripts).
#![cfg(unix)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use fleetpatch_proto::v1::{agent_report::Kind, AgentReport, FinalResult, PatchFinished, PatchOutcome};

fn finished(reports: &[AgentReport], index: u32) -> PatchFinished {
    reports
        .iter()
        .find_map(|r| match &r.kind {
            Some(Kind::Finished(f)) if f.patch_index == index => Some(f.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no finished report for patch {index}"))
}

fn final_result(reports: &[AgentReport]) -> FinalResult {
    match &reports.last().expect("reports").kind {
        Some(Kind::Final(result)) => result.clone(),
        other => panic!("the last report is not the final result: {other:?}"),
    }
}

fn outcome(finished: &PatchFinished) -> PatchOutcome {
    PatchOutcome::try_from(finished.outcome).unwrap()
}

#[test]
fn installs_patches_in_order_with_outcomes_heartbeats_and_reboot() {
    let collector = TestCollector::start();
    let stage = Stage::new();
    let mut reboot = TestPatch::script("reboot-required", "echo needs a reboot\nexit 3010\n");
    reboot.reboot_codes = vec![3010];
    stage.write_plan(
        &collector.url(),
        &[
            TestPatch::script("slow-ok", "echo installing slowly\nsleep 2.5\necho done\n"),
            TestPatch::script("fails", "echo about to fail\necho broken dependency >&2\nexit 7\n"),
            reboot,
        ],
        1,
        "if_required",
        true,
    );
    let log_file = stage.outside("agent.log");
    let mut arguments = stage.run_arguments();
    arguments.extend(["--log".to_owned(), log_file.display().to_string()]);

    let output = run_agent(&arguments);
    assert!(output.status.success(), "exit status {:?}", output.status);
    collector.assert_no_violations();
    let (reports, duplicates) = collector.unique_reports();
    assert_eq!(duplicates, 0, "a healthy collector sees no duplicates");
    assert_gapless_in_order(&reports);
    assert_eq!(
        describe_all(&reports),
        ["started 0", "heartbeat 0", "finished 0", "started 1", "finished 1", "started 2", "finished 2", "final"]
    );
    let slow = finished(&reports, 0);
    let heartbeats = reports.iter().filter(|r| matches!(r.kind, Some(Kind::Heartbeat(_)))).count() as u64;
    assert!(
        (2..=slow.duration_ms / 1000).contains(&heartbeats),
        "{heartbeats} heartbeats (one a second) during a {} ms installer",
        slow.duration_ms
    );
    assert_eq!((outcome(&slow), slow.exit_code), (PatchOutcome::Installed, 0));
    assert!(slow.duration_ms >= 2500, "{}", slow.duration_ms);
    assert_eq!(slow.output_tail, "installing slowly\ndone\n");

    let failed = finished(&reports, 1);
    assert_eq!((outcome(&failed), failed.exit_code), (PatchOutcome::Failed, 7));
    assert_eq!(failed.output_tail, "about to fail\nbroken dependency\n", "stderr is part of the tail");

    // `exit 3010` is status 194 on Unix (8-bit statuses); the plan's 3010 matches
    // its low byte, and the observed code is what is reported.
    let rebooting = finished(&reports, 2);
    assert_eq!((outcome(&rebooting), rebooting.exit_code), (PatchOutcome::InstalledRebootRequired, 3010 & 0xff));

    let result = final_result(&reports);
    assert!(!result.success);
    assert!(result.reboot_required);
    assert!(result.message.contains("patch 1 (fails): failed, exit code 7"), "{}", result.message);

    // if_required and a patch needed it: the (test) reboot command ran once.
    assert_eq!(std::fs::read_to_string(stage.reboot_marker()).unwrap(), "reboot\n");
    // keep_files: the per-patch scripts and the overview are there to read.
    let script = std::fs::read_to_string(stage.directory.join("fleetpatch-patch-1.sh")).unwrap();
    assert!(script.starts_with("#!/bin/sh\n"), "{script}");
    assert!(script.contains(&format!("/bin/sh '{}'", stage.directory.join("patch-1.sh").display())), "{script}");
    let overview = std::fs::read_to_string(stage.directory.join("deploypatches.sh")).unwrap();
    assert!(overview.contains("fleetpatch-patch-2.sh"), "{overview}");
    // The log file has the same lines as stderr, and never the token.
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(log.contains("patch failed") && log.contains("exit_code=7"), "{log}");
    assert!(!log.contains(TOKEN));
}

#[test]
fn a_checksum_mismatch_is_not_run_and_windows_kinds_fail_clearly() {
    let collector = TestCollector::start();
    let stage = Stage::new();
    let ran_marker = stage.outside("tampered-ran");
    let mut tampered = TestPatch::script("tampered", &format!("touch '{}'\n", ran_marker.display()));
    tampered.corrupt = true;
    let mut msi = TestPatch::script("windows-only", "exit 0\n");
    msi.installer = "msi";
    stage.write_plan(
        &collector.url(),
        &[tampered, TestPatch::script("fine", "echo fine\n"), msi],
        30,
        "if_required",
        false,
    );

    let output = run_agent(&stage.run_arguments());
    assert!(output.status.success());
    let (reports, _) = collector.unique_reports();
    assert_gapless_in_order(&reports);

    let mismatch = finished(&reports, 0);
    assert_eq!(outcome(&mismatch), PatchOutcome::ChecksumMismatch);
    assert_eq!(mismatch.exit_code, -1);
    assert!(mismatch.output_tail.contains("the installer was not run"), "{}", mismatch.output_tail);
    assert!(!ran_marker.exists(), "a tampered installer must not run");

    assert_eq!(outcome(&finished(&reports, 1)), PatchOutcome::Installed, "one bad patch does not stop the others");

    let windows = finished(&reports, 2);
    assert_eq!((outcome(&windows), windows.exit_code), (PatchOutcome::Failed, -1));
    assert!(windows.output_tail.contains("installer kind msi needs Windows"), "{}", windows.output_tail);

    let result = final_result(&reports);
    assert!(!result.success && !result.reboot_required);
    assert!(!stage.reboot_marker().exists(), "no reboot without a patch that needs one");
}

/// A relay that dies halfway through its first answer, then serves the
/// rest from the `Range` the agent asks for; returns its URL and the
/// request heads it saw.
fn start_flaky_relay(content: Vec<u8>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}/v1/content/{}", listener.local_addr().unwrap().port(), "b".repeat(64));
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&requests);
    std::thread::spawn(move || {
        for (number, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|read| read == 1) {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let start: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("Range: bytes=")?.strip_suffix('-')?.parse().ok())
                .unwrap_or(0);
            seen.lock().unwrap().push(head);
            let answer = if number == 0 {
                let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", content.len()).into_bytes();
                answer.extend_from_slice(&content[..content.len() / 2]);
                answer
            } else {
                let mut answer = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{}\r\nContent-Length: {}\r\n\r\n",
                    content.len() - 1,
                    content.len(),
                    content.len() - start
                )
                .into_bytes();
                answer.extend_from_slice(&content[start..]);
                answer
            };
            let _ = stream.write_all(&answer);
        }
    });
    (url, requests)
}

#[test]
fn an_installer_from_a_relay_is_downloaded_resumed_and_run_once() {
    let collector = TestCollector::start();
    let stage = Stage::new();
    let ran = stage.outside("ran");
    let script = format!("echo installed >> '{}'\n# {}\n", ran.display(), "padding ".repeat(4000));
    stage.write_plan(
        &collector.url(),
        &[TestPatch::script("downloaded", &script), TestPatch::script("staged", "echo staged\n")],
        1,
        "never",
        false,
    );
    // The worker staged patch 1 only; patch 0 comes from the relay.
    std::fs::remove_file(stage.directory.join(Stage::file_name(0))).unwrap();
    let (relay_url, requests) = start_flaky_relay(script.clone().into_bytes());
    let mut plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stage.plan_path()).unwrap()).unwrap();
    plan["patches"][0]["sources"] = serde_json::json!([relay_url]);
    plan["patches"][0]["size"] = script.len().into();
    std::fs::write(stage.plan_path(), plan.to_string()).unwrap();

    let output = run_agent(&stage.run_arguments());
    assert!(output.status.success(), "exit status {:?}", output.status);
    collector.assert_no_violations();
    let (reports, _) = collector.unique_reports();
    assert_gapless_in_order(&reports);
    let downloaded = finished(&reports, 0);
    assert_eq!(
        (outcome(&downloaded), downloaded.exit_code),
        (PatchOutcome::Installed, 0),
        "{}",
        downloaded.output_tail
    );
    assert_eq!(outcome(&finished(&reports, 1)), PatchOutcome::Installed);
    assert!(final_result(&reports).success);
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "installed\n", "the downloaded installer ran exactly once");

    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(requests[1].contains(&format!("\r\nRange: bytes={}-\r\n", script.len() / 2)), "{}", requests[1]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in ["download started", "download try failed", "download resumed", "download finished"] {
        assert!(stderr.contains(line), "{line:?} missing from the log:\n{stderr}");
    }
    // The downloaded installer went with the staged files; no `.part` is left.
    assert!(!stage.directory.exists(), "the staging directory is removed");
}

#[test]
fn a_timed_out_installer_is_killed_with_its_process_group() {
    let collector = TestCollector::start();
    let stage = Stage::new();
    let helper_pid_file = stage.outside("helper.pid");
    let mut hanging = TestPatch::script(
        "hangs",
        &format!("sleep 300 &\necho $! > '{}'\necho waiting forever\nsleep 300\n", helper_pid_file.display()),
    );
    hanging.timeout_seconds = 1;
    stage.write_plan(&collector.url(), &[hanging, TestPatch::script("next", "echo next\n")], 30, "never", false);

    let started = Instant::now();
    let output = run_agent(&stage.run_arguments());
    assert!(output.status.success());
    assert!(started.elapsed() < Duration::from_secs(20), "the agent did not wait for the 300 s installer");

    let (reports, _) = collector.unique_reports();
    let timed_out = finished(&reports, 0);
    assert_eq!(outcome(&timed_out), PatchOutcome::TimedOut);
    assert_eq!(timed_out.exit_code, 128 + 9, "killed by SIGKILL");
    assert!(timed_out.output_tail.starts_with("waiting forever\n"), "{}", timed_out.output_tail);
    assert!(timed_out.output_tail.contains("timed out after 1 s"), "{}", timed_out.output_tail);
    assert!((1000..10_000).contains(&timed_out.duration_ms), "{}", timed_out.duration_ms);
    assert_eq!(outcome(&finished(&reports, 1)), PatchOutcome::Installed);

    let helper: u32 = std::fs::read_to_string(&helper_pid_file).unwrap().trim().parse().unwrap();
    wait_until(Duration::from_secs(5), "the background helper to die", || process_is_gone(helper));
}

#[test]
fn reports_are_spooled_while_the_collector_is_down_and_replayed_in_order() {
    let mut collector = TestCollector::start();
    collector.close();
    let stage = Stage::new();
    stage.write_plan(
        &collector.url(),
        &[
            TestPatch::script("a", "echo a\n"),
            TestPatch::script("b", "sleep 1.5\necho b\n"),
            TestPatch::script("c", "echo c\nexit 1\n"),
        ],
        1,
        "never",
        false,
    );
    let agent = spawn_agent(Path::new(agent_binary()), &stage.run_arguments());

    // Port closed: the reports pile up in the spool.
    let spool = stage.directory.join("spool.bin");
    wait_until(Duration::from_secs(30), "the final report in the spool", || {
        read_spool(&spool).iter().any(|r| matches!(r.kind, Some(Kind::Final(_))))
    });
    // Then the collector is back but overloaded.
    collector.set_mode(Mode::Status(503));
    collector.reopen();
    wait_until(Duration::from_secs(10), "503 answers", || {
        collector.with_record(|record| record.statuses.iter().filter(|s| **s == 503).count() >= 2)
    });
    collector.set_mode(Mode::Accept);

    let output = wait_agent(agent, Duration::from_secs(60));
    assert!(output.status.success(), "{:?}", output.status);
    collector.assert_no_violations();
    let (reports, duplicates) = collector.unique_reports();
    eprintln!("{} reports, {duplicates} duplicates", reports.len());
    assert_gapless_in_order(&reports);
    assert_eq!(
        describe_all(&reports),
        ["started 0", "finished 0", "started 1", "heartbeat 1", "finished 1", "started 2", "finished 2", "final"]
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot deliver reports; will retry"), "{stderr}");
    assert!(stderr.contains("HTTP 503"), "{stderr}");
    // Drained, so the spool went with the other staged files.
    assert!(!spool.exists());
}

#[test]
fn a_restarted_agent_replays_its_spool_and_resumes() {
    let mut collector = TestCollector::start();
    collector.close();
    let stage = Stage::new();
    let group_file = stage.outside("installer.pgid");
    let resumable = format!(
        "if [ -e \"$(dirname \"$0\")/go\" ]; then echo resumed; exit 0; fi\necho $$ > '{}'\nsleep 60\n",
        group_file.display()
    );
    stage.write_plan(
        &collector.url(),
        &[TestPatch::script("first", "echo first\n"), TestPatch::script("second", &resumable)],
        1,
        "never",
        false,
    );
    let spool = stage.directory.join("spool.bin");

    let mut first_run = spawn_agent(Path::new(agent_binary()), &stage.run_arguments());
    wait_until(Duration::from_secs(30), "patch 1 to start and heartbeat", || {
        read_spool(&spool).iter().any(|r| describe(r) == "heartbeat 1")
    });
    first_run.kill().unwrap();
    let _ = wait_agent(first_run, Duration::from_secs(10));
    // The installer of the killed agent is still running; stop it as an operator would.
    let group = std::fs::read_to_string(&group_file).unwrap().trim().to_owned();
    std::process::Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).status().unwrap();

    let spooled = read_spool(&spool);
    assert!(spooled.len() >= 4, "{spooled:?}");
    std::fs::write(stage.directory.join("go"), "").unwrap();
    collector.reopen();

    let output = run_agent(&stage.run_arguments());
    assert!(output.status.success());
    collector.assert_no_violations();
    let (reports, duplicates) = collector.unique_reports();
    assert_eq!(duplicates, 0);
    assert_gapless_in_order(&reports);
    assert_eq!(&reports[..spooled.len()], spooled.as_slice(), "the spool is replayed first, unchanged");
    assert_eq!(
        describe_all(&reports),
        ["started 0", "finished 0", "started 1", "heartbeat 1", "started 1", "finished 1", "final"],
        "patch 0 is not run again; patch 1, interrupted, is"
    );
    assert_eq!(finished(&reports, 1).output_tail, "resumed\n");
    let result = final_result(&reports);
    assert!(result.success, "{}", result.message);
}

#[test]
fn cleanup_removes_only_the_staged_files_unless_keep_files() {
    for keep_files in [false, true] {
        let collector = TestCollector::start();
        let stage = Stage::new();
        stage.write_plan(&collector.url(), &[TestPatch::script("a", "echo a\n")], 30, "always", keep_files);
        // Staged like a worker does: the agent binary lives beside the plan.
        let binary = stage.directory.join("fleetpatch-agent");
        std::fs::copy(agent_binary(), &binary).unwrap();
        std::fs::write(stage.directory.join("operator-notes.txt"), "not ours").unwrap();
        let mut arguments = stage.run_arguments();
        arguments.extend(["--log".to_owned(), stage.directory.join("agent.log").display().to_string()]);

        let output = wait_agent(spawn_agent(&binary, &arguments), Duration::from_secs(60));
        assert!(output.status.success());
        assert!(final_result(&collector.unique_reports().0).success);
        assert_eq!(std::fs::read_to_string(stage.reboot_marker()).unwrap(), "reboot\n", "reboot policy always");

        let mut left: Vec<String> = std::fs::read_dir(&stage.directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        if keep_files {
            assert_eq!(
                left,
                [
                    "agent.log",
                    "deploypatches.sh",
                    "fleetpatch-agent",
                    "fleetpatch-patch-0.sh",
                    "operator-notes.txt",
                    "patch-0.sh",
                    "plan.json",
                    "spool.bin",
                    "spool.bin.state"
                ]
            );
        } else {
            assert_eq!(left, ["operator-notes.txt"], "only what the agent did not stage is left");
        }
    }
}

#[test]
fn an_empty_staging_directory_is_removed_too() {
    let collector = TestCollector::start();
    let stage = Stage::new();
    stage.write_plan(&collector.url(), &[TestPatch::script("a", "echo a\n")], 30, "never", false);
    let output = run_agent(&stage.run_arguments());
    assert!(output.status.success());
    assert!(!stage.directory.exists());
}

#[test]
fn a_refused_token_is_not_retried_forever_and_keeps_the_spool() {
    let collector = TestCollector::start();
    collector.set_mode(Mode::Status(401));
    let stage = Stage::new();
    stage.write_plan(&collector.url(), &[TestPatch::script("a", "echo a\n")], 30, "never", false);

    let output = run_agent(&stage.run_arguments());
    assert_eq!(output.status.code(), Some(3), "reports undelivered");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("collector refused the token"), "{stderr}");
    assert!(stderr.contains("HTTP 401"), "{stderr}");
    assert_eq!(collector.with_record(|record| record.statuses.len()), 1, "one refusal is enough");
    // Installers and scripts are gone; the plan and spool stay for `drain`.
    assert!(!stage.directory.join("patch-0.sh").exists());
    assert!(stage.plan_path().exists());
    assert_eq!(describe_all(&read_spool(&stage.directory.join("spool.bin"))), ["started 0", "finished 0", "final"]);

    // Once the token is accepted, `drain` delivers them and cleans up.
    collector.set_mode(Mode::Accept);
    let mut arguments = stage.run_arguments();
    arguments[0] = "drain".into();
    let output = run_agent(&arguments);
    assert!(output.status.success());
    let (reports, _) = collector.unique_reports();
    assert_eq!(describe_all(&reports), ["started 0", "finished 0", "final"]);
    assert!(!stage.directory.exists());
}

#[test]
fn an_attempt_closed_by_the_collector_ends_reporting_and_drops_the_spool() {
    // 409: the collector has this attempt's final result (e.g. after a
    // watchdog timeout) and will accept nothing more for it.
    let collector = TestCollector::start();
    collector.set_mode(Mode::Status(409));
    let stage = Stage::new();
    stage.write_plan(&collector.url(), &[TestPatch::script("a", "echo a\n")], 30, "never", false);

    let output = run_agent(&stage.run_arguments());
    assert_eq!(output.status.code(), Some(3), "reports undelivered");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("accepts nothing more; dropping the unsent reports"), "{stderr}");
    assert_eq!(collector.with_record(|record| record.statuses.len()), 1, "no request after the 409");
    // Nothing is left to deliver: the spool, the plan and the staged files are gone.
    assert!(!stage.directory.exists(), "the staging directory is removed");
}

#[test]
fn a_refused_report_is_isolated_and_dropped_without_blocking_the_rest() {
    let mut collector = TestCollector::start();
    collector.close();
    let stage = Stage::new();
    stage.write_plan(&collector.url(), &[TestPatch::script("a", "echo a\n")], 30, "never", false);
    let agent = spawn_agent(Path::new(agent_binary()), &stage.run_arguments());
    let spool = stage.directory.join("spool.bin");
    wait_until(Duration::from_secs(30), "the final report in the spool", || read_spool(&spool).len() == 3);
    // One batch [1, 2, 3] arrives; the collector refuses any batch holding seq 2.
    collector.set_mode(Mode::RefuseSeq(2));
    collector.reopen();

    let output = wait_agent(agent, Duration::from_secs(60));
    assert!(output.status.success());
    let (reports, _) = collector.unique_reports();
    assert_eq!(describe_all(&reports), ["started 0", "final"]);
    assert_eq!(collector.with_record(|r| r.statuses.clone()), [400, 200, 400, 400, 200]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("collector refused a report; dropping it seq=2"), "{stderr}");
}

#[test]
fn bad_plans_are_refused_naming_the_field() {
    let collector = TestCollector::start();
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 4] = [
        ("version", |plan| plan["version"] = 2.into(), "field `version`: unsupported plan version 2"),
        (
            "installer kind",
            |plan| plan["patches"][0]["installer"] = "apk".into(),
            "field `patches[0].installer`: unknown variant `apk`",
        ),
        ("parent directory", |plan| plan["patches"][0]["file"] = "../../etc/passwd".into(), "field `patches[0].file`"),
        ("separator", |plan| plan["patches"][0]["file"] = "sub/x.sh".into(), "must be a plain file name"),
    ];
    for (case, edit, expected) in cases {
        let stage = Stage::new();
        stage.write_plan(&collector.url(), &[TestPatch::script("a", "echo a\n")], 30, "never", false);
        let mut plan: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(stage.plan_path()).unwrap()).unwrap();
        edit(&mut plan);
        std::fs::write(stage.plan_path(), plan.to_string()).unwrap();

        let output = run_agent(&stage.run_arguments());
        assert_eq!(output.status.code(), Some(1), "{case}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{case}: {stderr}");
        assert!(stderr.contains("plan.json"), "{case}: the error names the file: {stderr}");

        let check = std::process::Command::new(agent_binary())
            .args(["check", "--plan", &stage.plan_path().display().to_string()])
            .output()
            .unwrap();
        assert_eq!(check.status.code(), Some(1), "{case}");
    }
    assert_eq!(collector.with_record(|record| record.statuses.len()), 0, "nothing is reported for a bad plan");

    let usage = std::process::Command::new(agent_binary()).args(["run"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("run needs --plan"));
}

#[test]
fn the_plans_reboot_command_wins_over_the_agents_default() {
    let collector = TestCollector::start();
    let stage = Stage::new();
    stage.write_plan(&collector.url(), &[TestPatch::script("a", "echo a\n")], 30, "always", false);
    let mut plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(stage.plan_path()).unwrap()).unwrap();
    let marker = stage.outside("plan-reboot");
    plan["reboot_command"] = format!("echo from-plan >> '{}'", marker.display()).into();
    std::fs::write(stage.plan_path(), plan.to_string()).unwrap();

    let output = wait_agent(spawn_agent(Path::new(agent_binary()), &stage.run_arguments()), Duration::from_secs(60));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(final_result(&collector.unique_reports().0).success);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "from-plan\n", "the worker's command ran");
    assert!(!stage.reboot_marker().exists(), "and not the agent's --reboot-command");
}

#[test]
fn a_detached_agent_leads_its_own_session_ignores_hangups_and_runs_the_plan() {
    let collector = TestCollector::start();
    let stage = Stage::new();
    let release = stage.outside("release");
    let waits = format!("while [ ! -e '{}' ]; do sleep 0.05; done\necho released\n", release.display());
    stage.write_plan(&collector.url(), &[TestPatch::script("waits", &waits)], 1, "never", false);
    let pid_file = stage.outside("agent.pid");
    let log = std::fs::File::create(stage.outside("agent.log")).unwrap();
    let mut arguments = stage.run_arguments();
    arguments.extend(["--detach".to_owned(), pid_file.display().to_string()]);
    // Its output goes to a file, as the start script's does: the detached
    // agent keeps the descriptors it inherited.
    let status = std::process::Command::new(agent_binary())
        .args(&arguments)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert!(status.success(), "{status:?}");

    // The command returned while the patch still waits for its release.
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(!process_is_gone(pid), "the agent runs on after the command returned");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // state, ppid, process group, session
    assert_eq!(fields[2], pid.to_string(), "the agent leads its process group: {stat}");
    assert_eq!(fields[3], pid.to_string(), "the agent leads a session of its own: {stat}");

    // A hang-up does not end it: the plan still runs to its final result.
    let hup = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap();
    assert!(hup.success());
    std::fs::write(&release, "").unwrap();
    wait_until(Duration::from_secs(60), "the detached agent to end", || process_is_gone(pid));
    let (reports, _) = collector.unique_reports();
    assert_eq!(outcome(&finished(&reports, 0)), PatchOutcome::Installed, "{:?}", describe_all(&reports));
    assert!(final_result(&reports).success);
}

#[test]
fn a_detached_agent_that_cannot_write_its_pid_file_fails_the_command_and_runs_nothing() {
    let collector = TestCollector::start();
    let stage = Stage::new();
    let marker = stage.outside("ran");
    stage.write_plan(
        &collector.url(),
        &[TestPatch::script("must-not-run", &format!("touch '{}'\n", marker.display()))],
        1,
        "never",
        false,
    );
    let pid_file = stage.outside("no-such-directory/agent.pid");
    let mut arguments = stage.run_arguments();
    arguments.extend(["--detach".to_owned(), pid_file.display().to_string()]);
    let output = run_agent(&arguments);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("write the pid file") && stderr.contains("no-such-directory"), "{stderr}");
    assert!(stderr.contains("did not start"), "the command says the agent did not start: {stderr}");
    assert!(!marker.exists(), "no patch ran");
    assert!(collector.unique_reports().0.is_empty(), "nothing was reported");
}
