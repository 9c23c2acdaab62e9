//! The evidence report of a rollout through the API: what it says (per
//! target and patch, who did what, the timeline), in JSON, CSV and HTML,
//! hostile host names made inert, and the stored digest that tells an
//! issued copy from a changed one.

use std::time::Duration;

use fleetpatch_proto::state::RolloutState;
use fleetpatch_tests::{behaviour, client_with, sim_rollout, Sandbox, SandboxOptions};
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollouts_evidence_report_accounts_for_every_target_patch_and_actor() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let mut request = sim_rollout("evidence", 4, 2, 4, 30);
    // The first wave's name sorts after the second's: the report keeps the rollout's order.
    request["waves"] =
        serde_json::json!([{"name": "servers", "size": 1, "require_approval": true}, {"name": "desktops"}]);
    request["targets"][0]["host"] = serde_json::json!("<img src=x onerror=alert(1)>\u{202e}fdp.exe");
    request["targets"][2]["labels"] = serde_json::to_value(behaviour("fail_patch")).unwrap();
    let id = sandbox.create_rollout(request).await;
    sandbox.wait_for_rollout_state(id, RolloutState::AwaitingApproval, Duration::from_secs(60)).await;
    assert_eq!(sandbox.post(&format!("/v1/rollouts/{id}/approve")).await.status(), 200);
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;

    // A viewer (an auditor) may read it.
    let viewer = sandbox.api_key("auditor", fleetpatch_store::Role::Viewer, None).await;
    let auditor = client_with(Some(&viewer));
    let get = |format: &str| auditor.get(format!("{}/v1/rollouts/{id}/report?format={format}", sandbox.api)).send();

    let response = get("json").await.unwrap();
    assert_eq!(response.status(), 200);
    let digest = response.headers()["x-fleetpatch-report-sha256"].to_str().unwrap().to_owned();
    let body = response.bytes().await.unwrap();
    assert_eq!(digest, hex::encode(Sha256::digest(&body)), "the header is the body's sha256");
    let report: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["generated_by"], "auditor");
    assert_eq!(report["rollout"]["state"], "completed");
    let targets = report["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 4);
    let failed = targets.iter().find(|t| t["state"] == "failed").expect("the fail_patch host failed");
    assert_eq!(failed["patches"][0]["exit_code"], 1603, "{failed}");
    assert!(targets.iter().all(|t| t["patches"].as_array().unwrap().len() == 2), "{targets:?}");
    assert_eq!(report["summary"]["servers"]["succeeded"], 1);
    let calls: Vec<(&str, &str)> = report["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["route"].as_str().unwrap(), e["actor_kind"].as_str().unwrap()))
        .collect();
    assert_eq!(calls[0].0, "/v1/rollouts", "created first: {calls:?}");
    assert!(calls.contains(&("/v1/rollouts/{id}/approve", "api_key")), "who approved: {calls:?}");
    assert!(report["timeline"].as_array().unwrap().len() >= 4 * 5, "every state change of every target");

    let csv = get("csv").await.unwrap().text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + 4 * 2, "{csv}");
    assert!(lines[0].starts_with("rollout,wave,target_id,host,"), "{csv}");
    assert!(lines.iter().any(|l| l.contains(",failed,") && l.contains(",1603,")), "{csv}");

    let html = get("html").await.unwrap().text().await.unwrap();
    assert!(html.contains("<svg") && html.contains("Who did what"), "{html}");
    let (first, second) = (html.find("<td>servers</td>").unwrap(), html.find("<td>desktops</td>").unwrap());
    assert!(first < second, "waves in the rollout's order, not by name");
    assert!(!html.contains("<img") && html.contains("&lt;img src=x onerror=alert(1)&gt;fdp.exe"), "host escaped");
    assert!(!html.contains('\u{202e}'), "bidi override removed");
    assert!(!html.contains("<script") && !html.contains("href=") && !html.contains("http"), "self-contained: {html}");

    // The digest of every issued report is kept; a changed copy is unknown.
    let issued = |sha: String| auditor.get(format!("{}/v1/reports/{sha}", sandbox.api)).send();
    let record: serde_json::Value = issued(digest.clone()).await.unwrap().json().await.unwrap();
    assert_eq!((record["format"].as_str(), record["created_by"].as_str()), (Some("json"), Some("auditor")));
    assert_eq!(record["rollout_id"], id.to_string());
    let html_sha = hex::encode(Sha256::digest(html.as_bytes()));
    assert_eq!(issued(html_sha).await.unwrap().status(), 200);
    let changed = hex::encode(Sha256::digest(html.replacen("failed", "succeeded", 1).as_bytes()));
    assert_eq!(issued(changed).await.unwrap().status(), 404);
    assert_eq!(issued("not-a-digest".into()).await.unwrap().status(), 400);
    assert_eq!(get("pdf").await.unwrap().status(), 400);
    let unknown = auditor.get(format!("{}/v1/rollouts/{}/report", sandbox.api, uuid::Uuid::new_v4())).send().await;
    assert_eq!(unknown.unwrap().status(), 404);
    sandbox.stop().await;
}
