//! The collector's refusals and its idempotency, on the real services.

use std::time::Duration;

use fleetpatch_proto::state::TargetState;
use fleetpatch_proto::v1::{self, agent_report::Kind};
use fleetpatch_proto::Message;
use fleetpatch_tests::{behaviour, sim_rollout, Sandbox, SandboxOptions, TOKEN_KEY};

fn heartbeat(seq: u64) -> Vec<u8> {
    v1::ReportBatch {
        reports: vec![v1::AgentReport {
            seq,
            sent_at_unix_ms: 0,
            kind: Some(Kind::Heartbeat(v1::Heartbeat { patch_index: None })),
        }],
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_need_the_targets_own_token_and_a_sane_body() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let mut request = sim_rollout("collector", 2, 1, 2, 60);
    for i in 0..2 {
        request["targets"][i]["labels"] = serde_json::to_value(behaviour("hang")).unwrap();
    }
    let id = sandbox.create_rollout(request).await;
    let mut targets = sandbox.all_targets(id).await;
    for target in targets.iter_mut() {
        *target = sandbox.wait_for_target_state(target.id, &[TargetState::Running], Duration::from_secs(30)).await;
    }
    let token = |t: &fleetpatch_store::Target| {
        fleetpatch_worker::derive_token(TOKEN_KEY.as_bytes(), t.id, t.attempt, t.token_nonce.as_deref().unwrap())
    };
    let (a, b) = (&targets[0], &targets[1]);
    let url = |t: &fleetpatch_store::Target| format!("http://{}/v1/targets/{}/reports", sandbox.collector, t.id);
    let post = |url: String, token: Option<String>, body: Vec<u8>| {
        let mut request = sandbox.http.post(url).header("content-type", "application/x-protobuf").body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    // Its own token: accepted, and a duplicate seq is not counted twice.
    let response = post(url(a), Some(token(a)), heartbeat(100)).await.unwrap();
    assert_eq!(response.status(), 200);
    let ack = v1::ReportAck::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!((ack.accepted, ack.duplicates), (1, 0));
    let response = post(url(a), Some(token(a)), heartbeat(100)).await.unwrap();
    let ack = v1::ReportAck::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!((ack.accepted, ack.duplicates), (0, 1));
    let events = sandbox.store.agent_events(a.id).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.seq == 100).count(), 1);

    // Another target's token: 403, naming why.
    let response = post(url(a), Some(token(b)), heartbeat(101)).await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    assert!(response.text().await.unwrap().contains("belongs to another target"));
    // A bad token, or none: 401.
    let forged = format!("{}.{}", a.id.simple(), "0".repeat(64));
    assert_eq!(post(url(a), Some(forged), heartbeat(102)).await.unwrap().status(), 401);
    assert_eq!(post(url(a), Some("garbage".into()), heartbeat(102)).await.unwrap().status(), 401);
    assert_eq!(post(url(a), None, heartbeat(102)).await.unwrap().status(), 401);
    // A malformed body: 400, saying what it expected.
    let response = post(url(a), Some(token(a)), vec![0xff, 0xff, 0xff, 0x01]).await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("ReportBatch"));
    let empty = v1::ReportBatch { reports: vec![] }.encode_to_vec();
    assert_eq!(post(url(a), Some(token(a)), empty).await.unwrap().status(), 400);
    let no_kind =
        v1::ReportBatch { reports: vec![v1::AgentReport { seq: 5, sent_at_unix_ms: 0, kind: None }] }.encode_to_vec();
    assert_eq!(post(url(a), Some(token(a)), no_kind).await.unwrap().status(), 400);
    // An oversized body: 413.
    let huge = vec![0u8; fleetpatch_proto::limits::MAX_REPORT_BODY_BYTES + 1];
    assert_eq!(post(url(a), Some(token(a)), huge).await.unwrap().status(), 413);
    // A path that is not a target id: 400.
    let response = post(format!("http://{}/v1/targets/nope/reports", sandbox.collector), Some(token(a)), heartbeat(1))
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // The collector is still healthy after all of that.
    let ready = sandbox.http.get(format!("http://{}/readyz", sandbox.collector)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = sandbox.http.get(format!("http://{}/metrics", sandbox.collector)).send().await.unwrap();
    assert!(metrics.text().await.unwrap().contains("fleetpatch_collector_reports_total"));
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_names_the_wrong_field() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let mut request = sim_rollout("bad", 2, 1, 1, 60);
    request["targets"][1]["host"] = serde_json::json!("");
    let response = sandbox.http.post(format!("{}/v1/rollouts", sandbox.api)).json(&request).send().await.unwrap();
    assert_eq!(response.status(), 422);
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "targets[1].host");
    request["targets"][1]["host"] = serde_json::json!(7);
    let response = sandbox.http.post(format!("{}/v1/rollouts", sandbox.api)).json(&request).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let problem: serde_json::Value = response.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "targets[1].host");
    let response =
        sandbox.http.get(format!("{}/v1/rollouts/{}", sandbox.api, uuid::Uuid::new_v4())).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let response = sandbox.http.get(format!("{}/openapi.json", sandbox.api)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    sandbox.stop().await;
}
