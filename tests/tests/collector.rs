//! The collector's refusals and its idempotency, on the real services.

use std::time::Duration;

use fleetpatch_proto::state::TargetState;
use fleetpatch_proto::v1::{self, agent_report::Kind};
use fleetpatch_proto::Message;
use fleetpatch_tests::{agent_token, behaviour, now_unix_ms, sign_report, sim_rollout, Sandbox, SandboxOptions};

fn heartbeat(seq: u64) -> Vec<u8> {
    heartbeats(&[seq])
}

fn heartbeats(seqs: &[u64]) -> Vec<u8> {
    let reports = seqs
        .iter()
        .map(|&seq| v1::AgentReport {
            seq,
            sent_at_unix_ms: 0,
            agent_instance: 1,
            kind: Some(Kind::Heartbeat(v1::Heartbeat { patch_index: None })),
        })
        .collect();
    v1::ReportBatch { reports }.encode_to_vec()
}

/// A rollout of `count` targets whose agents hang in their patch, once all are running.
async fn running_targets(sandbox: &Sandbox, name: &str, count: usize) -> Vec<fleetpatch_store::Target> {
    let mut request = sim_rollout(name, count, 1, count as u32, 60);
    for i in 0..count {
        request["targets"][i]["labels"] = serde_json::to_value(behaviour("hang")).unwrap();
    }
    let id = sandbox.create_rollout(request).await;
    let mut targets = sandbox.all_targets(id).await;
    for target in targets.iter_mut() {
        *target = sandbox.wait_for_target_state(target.id, &[TargetState::Running], Duration::from_secs(30)).await;
    }
    targets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_need_the_targets_own_signature_and_a_sane_body() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let targets = running_targets(&sandbox, "collector", 2).await;
    let (a, b) = (&targets[0], &targets[1]);
    let url = |t: &fleetpatch_store::Target| format!("http://{}/v1/targets/{}/reports", sandbox.collector, t.id);
    // Signed as `signer`'s agent would sign it, now.
    let post = |url: String, signer: Option<&fleetpatch_store::Target>, body: Vec<u8>| {
        let mut request = sandbox.http.post(url).header("content-type", "application/x-protobuf");
        if let Some(signer) = signer {
            request = request.header("authorization", sign_report(signer, &body, now_unix_ms()));
        }
        request.body(body).send()
    };

    // Signed with its own key: accepted, and a duplicate seq is not counted twice.
    let response = post(url(a), Some(a), heartbeat(100)).await.unwrap();
    assert_eq!(response.status(), 200);
    let ack = v1::ReportAck::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!((ack.accepted, ack.duplicates), (1, 0));
    let response = post(url(a), Some(a), heartbeat(100)).await.unwrap();
    let ack = v1::ReportAck::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!((ack.accepted, ack.duplicates), (0, 1));
    let beats = sandbox.store.heartbeats(a.id).await.unwrap();
    assert_eq!(beats.iter().map(|h| (h.count, h.last_seq)).collect::<Vec<_>>(), vec![(1, 100)], "counted once");

    // Signed by another target's agent: 403, naming why.
    let response = post(url(a), Some(b), heartbeat(101)).await.unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    assert!(response.text().await.unwrap().contains("signed for another target"));
    // A wrong MAC, the token sent as a bearer, garbage or nothing: 401, all alike.
    let body = heartbeat(102);
    let signed = sign_report(a, &body, now_unix_ms());
    let forged = format!("{}{}", &signed[..signed.len() - 64], "0".repeat(64));
    let bearer = format!("Bearer {}", agent_token(a));
    let mut bodies = Vec::new();
    for authorization in [Some(forged), Some(bearer), Some("garbage".to_owned()), None] {
        let mut request = sandbox.http.post(url(a)).body(body.clone());
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        bodies.push(response.text().await.unwrap());
    }
    assert!(bodies.windows(2).all(|pair| pair[0] == pair[1]), "one answer for every refusal: {bodies:?}");
    // Reports numbered above collector.max_events_per_attempt: 422, naming the setting.
    let response = post(url(a), Some(a), heartbeat(10_001)).await.unwrap();
    assert_eq!(response.status(), 422);
    assert!(response.text().await.unwrap().contains("collector.max_events_per_attempt"));
    assert!(sandbox.store.heartbeats(a.id).await.unwrap().iter().all(|h| h.last_seq <= 10_000));
    // A malformed body: 400, saying what it expected.
    let response = post(url(a), Some(a), vec![0xff, 0xff, 0xff, 0x01]).await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("ReportBatch"));
    let empty = v1::ReportBatch { reports: vec![] }.encode_to_vec();
    assert_eq!(post(url(a), Some(a), empty).await.unwrap().status(), 400);
    let no_kind = v1::ReportBatch {
        reports: vec![v1::AgentReport { seq: 5, sent_at_unix_ms: 0, agent_instance: 0, kind: None }],
    }
    .encode_to_vec();
    assert_eq!(post(url(a), Some(a), no_kind).await.unwrap().status(), 400);
    // An oversized body: 413.
    let huge = vec![0u8; fleetpatch_proto::limits::MAX_REPORT_BODY_BYTES + 1];
    assert_eq!(post(url(a), Some(a), huge).await.unwrap().status(), 413);
    // A path that is not a target id: 400.
    let response =
        post(format!("http://{}/v1/targets/nope/reports", sandbox.collector), Some(a), heartbeat(1)).await.unwrap();
    assert_eq!(response.status(), 400);
    // The collector is still healthy after all of that.
    let ready = sandbox.http.get(format!("http://{}/readyz", sandbox.collector)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = sandbox.http.get(format!("http://{}/metrics", sandbox.collector)).send().await.unwrap();
    assert!(metrics.text().await.unwrap().contains("fleetpatch_collector_reports_total"));
    sandbox.stop().await;
}

/// How many batches the collector of this process has written (its histogram's count).
async fn batches_written(sandbox: &Sandbox) -> u64 {
    let url = format!("http://{}/metrics", sandbox.collector);
    let text = sandbox.http.get(url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("fleetpatch_collector_batch_reports_count "))
        .map_or(0, |count| count.trim().parse().expect("a count"))
}

/// Requests written in one batch each get the results of their own reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sharing_a_batch_each_get_their_own_answer() {
    // One writer that waits long enough for the three requests below to join one batch.
    let collector = fleetpatch_collector::CollectorOptions { writers: 1, batch_wait_ms: 500, ..Default::default() };
    let sandbox = Sandbox::start(SandboxOptions { collector, ..SandboxOptions::default() }).await;
    let targets = running_targets(&sandbox, "collector-shared-batch", 2).await;
    let (a, b) = (&targets[0], &targets[1]);
    let post = |target: &fleetpatch_store::Target, body: Vec<u8>| {
        let url = format!("http://{}/v1/targets/{}/reports", sandbox.collector, target.id);
        let authorization = sign_report(target, &body, now_unix_ms());
        let request = sandbox.http.post(url).header("authorization", authorization).body(body);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let ack = v1::ReportAck::decode(response.bytes().await.unwrap()).unwrap();
            (ack.accepted, ack.duplicates)
        }
    };
    assert_eq!(post(a, heartbeats(&[200])).await, (1, 0));
    let before = batches_written(&sandbox).await;
    let (again, two_new, one_new) =
        tokio::join!(post(a, heartbeats(&[200])), post(b, heartbeats(&[300, 301])), post(a, heartbeats(&[201])));
    assert_eq!(batches_written(&sandbox).await - before, 1, "the three requests shared one batch");
    assert_eq!(again, (0, 1), "a's resent report is a duplicate");
    assert_eq!(two_new, (2, 0), "b's two reports are both new");
    assert_eq!(one_new, (1, 0), "a's next report is new");
    sandbox.stop().await;
}

/// `collector.heartbeat_events = "every"`: the summary, and a row per heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_heartbeat_events_every_the_collector_keeps_a_row_per_heartbeat() {
    let collector = fleetpatch_collector::CollectorOptions {
        heartbeat_events: fleetpatch_store::HeartbeatEvents::Every,
        ..Default::default()
    };
    let sandbox = Sandbox::start(SandboxOptions { collector, ..SandboxOptions::default() }).await;
    let target = running_targets(&sandbox, "collector-every", 1).await.remove(0);
    let url = format!("http://{}/v1/targets/{}/reports", sandbox.collector, target.id);
    for seq in [100, 101, 101] {
        let body = heartbeat(seq);
        let response = sandbox
            .http
            .post(&url)
            .header("authorization", sign_report(&target, &body, now_unix_ms()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let events = sandbox.store.agent_events(target.id).await.unwrap();
    let beats: Vec<(u64, &str)> = events.iter().filter(|e| e.seq >= 100).map(|e| (e.seq, e.kind.as_str())).collect();
    assert_eq!(beats, [(100, "heartbeat"), (101, "heartbeat")], "{events:?}");
    let summary = sandbox.store.heartbeats(target.id).await.unwrap();
    assert_eq!(summary.iter().map(|h| (h.count, h.last_seq)).collect::<Vec<_>>(), vec![(2, 101)], "{summary:?}");
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
