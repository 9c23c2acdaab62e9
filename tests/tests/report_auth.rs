//! Agent reports cannot be forged or replayed by someone between the agent
//! and the collector: a proxy in front of the real collector (PostgreSQL,
//! RabbitMQ) sees every request the simulated agents send, and what it can
//! do with them is refused without a trace in the database.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetpatch_proto::state::TargetState;
use fleetpatch_proto::v1::{self, agent_report::Kind};
use fleetpatch_proto::Message;
use fleetpatch_tests::{agent_token, behaviour, now_unix_ms, sign_report, sim_rollout, Sandbox, SandboxOptions};
use fleetpatch_worker::WorkerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// A request the proxy passed on.
#[derive(Debug, Clone)]
struct Captured {
    path: String,
    authorization: String,
    body: Vec<u8>,
}

/// An HTTP proxy on loopback that forwards report requests to `collector`
/// (one request per connection) and keeps a copy of each.
async fn start_proxy(collector: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<Captured>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
    let address = listener.local_addr().unwrap();
    let captured = Arc::new(Mutex::new(Vec::new()));
    let log = captured.clone();
    let http = reqwest::Client::new();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            let (log, http) = (log.clone(), http.clone());
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buffer = [0u8; 8192];
                let head_end = loop {
                    if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end + 4;
                    }
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => data.extend_from_slice(&buffer[..read]),
                    }
                };
                let head = String::from_utf8_lossy(&data[..head_end]).to_string();
                let mut lines = head.split("\r\n");
                let path = lines.next().unwrap_or_default().split(' ').nth(1).unwrap_or_default().to_owned();
                let (mut length, mut authorization) = (0usize, String::new());
                for line in lines {
                    if let Some((name, value)) = line.split_once(':') {
                        match name.trim().to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            "authorization" => authorization = value.trim().to_owned(),
                            _ => {}
                        }
                    }
                }
                while data.len() < head_end + length {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => data.extend_from_slice(&buffer[..read]),
                    }
                }
                let body = data[head_end..head_end + length].to_vec();
                log.lock().unwrap().push(Captured {
                    path: path.clone(),
                    authorization: authorization.clone(),
                    body: body.clone(),
                });
                let Ok(response) = http
                    .post(format!("http://{collector}{path}"))
                    .header("authorization", authorization)
                    .header("content-type", "application/x-protobuf")
                    .body(body)
                    .send()
                    .await
                else {
                    return;
                };
                let status = response.status().as_u16();
                let answer = response.bytes().await.unwrap_or_default();
                let head =
                    format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", answer.len());
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&answer).await;
            });
        }
    });
    (address, captured)
}

fn batch(reports: Vec<(u64, Kind)>) -> Vec<u8> {
    v1::ReportBatch {
        reports: reports
            .into_iter()
            .map(|(seq, kind)| v1::AgentReport {
                seq,
                sent_at_unix_ms: now_unix_ms(),
                agent_instance: 7,
                kind: Some(kind),
            })
            .collect(),
    }
    .encode_to_vec()
}

/// `finished(exit 0)` for patch 0 and `final(success)`: what a forger wants applied.
fn forged_success(first_seq: u64) -> Vec<u8> {
    batch(vec![
        (
            first_seq,
            Kind::Finished(v1::PatchFinished {
                patch_index: 0,
                exit_code: 0,
                outcome: v1::PatchOutcome::Installed as i32,
                output_tail: "forged".into(),
                duration_ms: 1,
            }),
        ),
        (
            first_seq + 1,
            Kind::Final(v1::FinalResult { success: true, reboot_required: false, message: "forged".into() }),
        ),
    ])
}

/// Everything the collector could change for a target.
async fn snapshot(sandbox: &Sandbox, target: Uuid) -> String {
    let t = sandbox.store.target(target).await.expect("target");
    let events = sandbox.store.agent_events(target).await.expect("events");
    let patches = sandbox.store.target_patches(target).await.expect("patches");
    format!("{:?} {} {:?} {:?} {:?} {events:?} {patches:?}", t.state, t.attempt, t.last_seen_at, t.error, t.finished_at)
}

async fn post(sandbox: &Sandbox, target: Uuid, authorization: &str, body: Vec<u8>) -> (u16, String) {
    let response = sandbox
        .http
        .post(format!("http://{}/v1/targets/{target}/reports", sandbox.collector))
        .header("authorization", authorization)
        .header("content-type", "application/x-protobuf")
        .body(body)
        .send()
        .await
        .expect("the collector answers");
    (response.status().as_u16(), response.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_between_agent_and_collector_can_neither_forge_nor_replay() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let (proxy, captured) = start_proxy(sandbox.collector).await;
    let _worker = sandbox
        .spawn_worker_with(WorkerOptions { collector_url: format!("http://{proxy}"), ..sandbox.worker_options() });
    let mut request = sim_rollout("report-auth", 2, 1, 2, 60);
    request["targets"][0]["labels"] = serde_json::to_value(behaviour("hang")).unwrap();
    let id = sandbox.create_rollout(request).await;
    let targets = sandbox.all_targets(id).await;
    let (hang, healthy) = (&targets[0], &targets[1]);
    let healthy = sandbox.wait_for_target_state(healthy.id, &[TargetState::Succeeded], Duration::from_secs(30)).await;
    let hang = sandbox.wait_for_target_state(hang.id, &[TargetState::Running], Duration::from_secs(30)).await;
    let started_seen = || captured.lock().unwrap().iter().any(|c| c.path.contains(&hang.id.to_string()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !started_seen() || sandbox.store.agent_events(hang.id).await.unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the hanging agent's `started` went through the proxy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let captured: Vec<Captured> = captured.lock().unwrap().clone();
    // What crossed the wire: signatures, never the token.
    for request in &captured {
        assert!(request.authorization.starts_with("FP1-HMAC-SHA256 "), "{request:?}");
        let token =
            if request.path.contains(&hang.id.to_string()) { agent_token(&hang) } else { agent_token(&healthy) };
        assert!(
            !request.authorization.contains(&token)
                && !request.authorization.contains(token.split_once('.').unwrap().1)
        );
    }
    let started = captured.iter().find(|c| c.path.contains(&hang.id.to_string())).expect("hang's request").clone();

    // The running target: nothing the proxy can do changes it.
    let before = snapshot(&sandbox, hang.id).await;
    // 1. The captured request, replayed as it was.
    let (status, text) = post(&sandbox, hang.id, &started.authorization, started.body.clone()).await;
    assert_eq!((status, text.contains("replayed")), (401, true), "{text}");
    // 2. The captured signature on a tampered body (the forged success).
    let (status, _) = post(&sandbox, hang.id, &started.authorization, forged_success(2)).await;
    assert_eq!(status, 401, "a tampered body");
    // 3. A correctly signed request, but with a timestamp outside the clock window.
    let body = forged_success(2);
    let stale = sign_report(&hang, &body, now_unix_ms() - 301_000);
    let (status, text) = post(&sandbox, hang.id, &stale, body).await;
    assert_eq!((status, text.contains("clock")), (408, true), "{text}");
    // 4. The token itself as a bearer, as agents used to send it.
    let (status, _) = post(&sandbox, hang.id, &format!("Bearer {}", agent_token(&hang)), forged_success(2)).await;
    assert_eq!(status, 401, "the token is not a credential on the wire");
    // 5. Another target's valid signature, for this target.
    let body = forged_success(2);
    let (status, _) = post(&sandbox, hang.id, &sign_report(&healthy, &body, now_unix_ms()), body).await;
    assert_eq!(status, 403, "signed for another target");
    assert_eq!(snapshot(&sandbox, hang.id).await, before, "nothing changed for the running target");
    assert_eq!(sandbox.store.target(hang.id).await.unwrap().state, TargetState::Running);

    // The finished target: its key no longer works at all.
    let before = snapshot(&sandbox, healthy.id).await;
    let last = captured.iter().rfind(|c| c.path.contains(&healthy.id.to_string())).expect("healthy's final").clone();
    let (status, _) = post(&sandbox, healthy.id, &last.authorization, last.body.clone()).await;
    assert_eq!(status, 401, "its final request, replayed");
    let body = batch(vec![(50, Kind::Heartbeat(v1::Heartbeat { patch_index: None }))]);
    let (status, text) = post(&sandbox, healthy.id, &sign_report(&healthy, &body, now_unix_ms()), body).await;
    assert_eq!((status, text.contains("final result")), (409, true), "a fresh, valid request after the final: {text}");
    assert_eq!(snapshot(&sandbox, healthy.id).await, before, "nothing changed for the finished target");
    let metrics = sandbox.http.get(format!("http://{}/metrics", sandbox.collector)).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains(r#"fleetpatch_collector_reports_total{result="late"}"#), "{metrics}");
    assert!(metrics.contains(r#"fleetpatch_collector_auth_refused_total{reason="replayed"}"#), "{metrics}");
    assert!(metrics.contains(r#"fleetpatch_collector_auth_refused_total{reason="bad_mac"}"#), "{metrics}");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_timeout_the_agent_is_heard_until_its_own_final_result_then_refused() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let mut request = sim_rollout("after-timeout", 1, 1, 1, 2);
    request["targets"][0]["labels"] = serde_json::to_value(behaviour("hang")).unwrap();
    let id = sandbox.create_rollout(request).await;
    let target = sandbox.all_targets(id).await.remove(0);
    let target = sandbox.wait_for_target_state(target.id, &[TargetState::TimedOut], Duration::from_secs(30)).await;
    let (sandbox_ref, target_id) = (&sandbox, target.id);
    let send = |body: Vec<u8>| {
        let authorization = sign_report(&target, &body, now_unix_ms());
        async move { post(sandbox_ref, target_id, &authorization, body).await }
    };
    // The agent was only slow: what it says now is stored as evidence and
    // changes no state (a verification scan tells the truth later).
    let (status, _) = send(forged_success(10)).await;
    assert_eq!(status, 200);
    let after = sandbox.store.target(target.id).await.unwrap();
    assert_eq!(after.state, TargetState::TimedOut, "a late final result is recorded, not applied");
    let events = sandbox.store.agent_events(target.id).await.unwrap();
    assert!(events.iter().any(|e| e.seq == 11 && e.kind == "final"), "{events:?}");
    // Its own final result is in: from now on its key is refused.
    let before = snapshot(&sandbox, target.id).await;
    let (status, _) = send(batch(vec![(12, Kind::Heartbeat(v1::Heartbeat { patch_index: None }))])).await;
    assert_eq!(status, 409);
    assert_eq!(snapshot(&sandbox, target.id).await, before);
    // Its retry of what is stored already (the answer to it was lost) is
    // acknowledged as duplicates, so the agent does not take stored
    // evidence for refused; a batch with anything new in it stays late.
    let (status, _) = send(forged_success(10)).await;
    assert_eq!(status, 200, "a retry of stored reports is acknowledged");
    let (status, _) = send(forged_success(11)).await;
    assert_eq!(status, 409, "seq 12 is new: the batch is late");
    assert_eq!(snapshot(&sandbox, target.id).await, before);
    sandbox.stop().await;
}
