//! `POST /v1/rollouts` read in passes (`intake.rs`), through the real
//! router and server on SQLite: the same rollout as the one-piece path
//! ([`super::validate`]), whatever the order of the body's fields, and every
//! refusal named with nothing created.

use super::test_api::{start_api, Api};
use super::*;

const SHA: &str = "0000000000000000000000000000000000000000000000000000000000000001";

/// A body written by hand, `targets` first, so the passes cannot lean on
/// the other fields coming before them.
fn body(targets: &[serde_json::Value], rest: serde_json::Value) -> String {
    let mut text = String::from("{\"targets\":[");
    for (i, target) in targets.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&target.to_string());
    }
    text.push(']');
    for (key, value) in rest.as_object().unwrap() {
        text.push_str(&format!(",{}:{value}", serde_json::Value::from(key.as_str())));
    }
    text.push('}');
    text
}

fn rest() -> serde_json::Value {
    serde_json::json!({
        "name": "large",
        "credential": "fleet",
        "waves": [{ "name": "canary", "size": 3 }, { "name": "rest" }],
        "patches": [{ "name": "p", "file": "p.msu", "sha256": SHA, "installer": "msu" }],
    })
}

fn sim_target(i: usize) -> serde_json::Value {
    let mut target = serde_json::json!({ "host": format!("h-{i:06}"), "transport": "sim" });
    if i.is_multiple_of(7) {
        target["wave"] = "rest".into();
    }
    if i.is_multiple_of(5) {
        target["labels"] = serde_json::json!({ "site": format!("s{}", i % 3) });
    }
    target
}

async fn post(api: &Api, body: String) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/rollouts", api.url))
        .bearer_auth(&api.operator_key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "raw": text })))
}

fn fields(problem: &serde_json::Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .map(|errors| errors.iter().filter_map(|e| e["field"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn policy() -> InputPolicy {
    InputPolicy { credential_names: ["fleet".to_owned()].into(), ..InputPolicy::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_of_several_chunks_is_stored_as_the_one_piece_path_would_store_it() {
    let api = start_api(policy()).await;
    // Three chunks of the store's intake: 10,000 + 10,000 + 7.
    let targets: Vec<_> = (0..super::intake::CHUNK * 2 + 7).map(sim_target).collect();
    let text = body(&targets, rest());
    let (status, created) = post(&api, text.clone()).await;
    assert_eq!(status, 201, "{created}");
    let id: Uuid = created["id"].as_str().unwrap().parse().unwrap();

    let expected = validate(serde_json::from_str(&text).unwrap(), &api.dir.0, &policy()).unwrap();
    let stored = api.store.targets(id, None, None, 100_000).await.unwrap();
    assert_eq!(stored.len(), expected.targets.len());
    for (i, (stored, expected)) in stored.iter().zip(&expected.targets).enumerate() {
        assert_eq!(stored.ordinal as usize, i);
        assert_eq!((&stored.host, &stored.labels, stored.wave), (&expected.host, &expected.labels, expected.wave));
        assert_eq!(stored.credential.as_deref(), Some("fleet"), "the rollout's credential is every target's");
    }
    // Targets 1, 2 and 3 fill the canary (0 names "rest"); the rest follow.
    let waves: Vec<u32> = stored.iter().take(6).map(|t| t.wave).collect();
    assert_eq!(waves, [1, 0, 0, 0, 1, 1]);
    let rollout = api.store.rollout(id).await.unwrap();
    assert_eq!(rollout.name, "large");
    api.stop.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_bodies_are_refused_naming_what_is_wrong_and_nothing_is_created() {
    let api = start_api(InputPolicy { max_targets_per_rollout: 30, ..policy() }).await;
    let targets: Vec<_> = (0..20).map(sim_target).collect();

    // A target's field of the wrong type, deep in the list: 400 with its path.
    let mut bad = targets.clone();
    bad[12]["port"] = "twenty-two".into();
    let (status, problem) = post(&api, body(&bad, rest())).await;
    assert_eq!((status, fields(&problem)), (400, vec!["targets[12].port".to_owned()]), "{problem}");
    // An unknown field in a target, or at the top.
    let mut bad = targets.clone();
    bad[3]["hots"] = "typo".into();
    let (status, problem) = post(&api, body(&bad, rest())).await;
    assert_eq!(status, 400, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("hots"), "{problem}");
    let mut extra = rest();
    extra["concurency"] = 5.into();
    let (status, problem) = post(&api, body(&targets, extra)).await;
    assert_eq!(status, 400, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("concurency"), "{problem}");
    // `targets` twice, not a list, or something after the body.
    let twice = body(&targets, rest()).replacen("{\"targets\":[", "{\"targets\":[],\"targets\":[", 1);
    let (status, problem) = post(&api, twice).await;
    assert_eq!(status, 400, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("duplicate field `targets`"), "{problem}");
    let mut not_a_list = rest();
    not_a_list["targets"] = "all".into();
    let (status, problem) = post(&api, not_a_list.to_string()).await;
    assert_eq!((status, fields(&problem)), (400, vec!["targets".to_owned()]), "{problem}");
    let (status, problem) = post(&api, body(&targets, rest()) + " {}").await;
    assert_eq!(status, 400, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("trailing characters"), "{problem}");
    let (status, problem) = post(&api, body(&targets, rest())[..200].to_owned()).await;
    assert_eq!(status, 400, "a body cut short: {problem}");

    // Checks that need the other fields, which come after the targets.
    let mut bad = targets.clone();
    bad[3]["transport"] = "telnet".into();
    bad[5]["wave"] = "pilot".into();
    bad[9]["credential"] = "root-password".into();
    let (status, problem) = post(&api, body(&bad, rest())).await;
    assert_eq!(status, 422, "{problem}");
    // "telnet" is not "sim": the installer is looked for too.
    let expected = ["targets[3].transport", "targets[5].wave", "targets[9].credential", "patches[0].sha256"];
    assert_eq!(fields(&problem), expected, "{problem}");
    // Too many targets (the limit is 30 here); none at all.
    let many: Vec<_> = (0..31).map(sim_target).collect();
    let (status, problem) = post(&api, body(&many, rest())).await;
    assert_eq!((status, fields(&problem)), (422, vec!["targets".to_owned()]), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("31 targets; at most 30"), "{problem}");
    let (status, problem) = post(&api, body(&[], rest())).await;
    assert_eq!((status, fields(&problem)), (422, vec!["targets".to_owned()]), "{problem}");
    // A real transport needs the installer in the content store.
    let mut ssh = targets.clone();
    ssh[0]["transport"] = "ssh".into();
    let (status, problem) = post(&api, body(&ssh, rest())).await;
    assert_eq!((status, fields(&problem)), (422, vec!["patches[0].sha256".to_owned()]), "{problem}");
    // NUL in a target's label, after the other fields' checks passed.
    let mut nul = targets.clone();
    nul[19]["labels"] = serde_json::json!({ "site": "par\u{0}is" });
    let (status, problem) = post(&api, body(&nul, rest())).await;
    assert_eq!((status, fields(&problem)), (422, vec!["targets[19].labels.site".to_owned()]), "{problem}");

    assert!(api.store.list_rollouts(10).await.unwrap().is_empty(), "nothing was created");
    // And the same body, put right, is taken.
    let (status, created) = post(&api, body(&targets, rest())).await;
    assert_eq!(status, 201, "{created}");
    api.stop.trigger();
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_while_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = futures_util::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 1_000]))));
    let problem = super::intake::spool(Body::from_stream(chunks), dir.path(), 3_500).await.unwrap_err();
    assert_eq!(problem.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(problem.detail.contains("at most 3500 bytes"), "{}", problem.detail);
    let at_the_limit = Body::from(vec![b' '; 3_500]);
    assert!(super::intake::spool(at_the_limit, dir.path(), 3_500).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_beyond_the_limit_at_once_are_refused_and_every_slot_comes_back() {
    let api = start_api(policy()).await;
    let targets: Vec<_> = (0..5).map(sim_target).collect();
    // Every slot taken, as by MAX_CONCURRENT_CREATES bodies still arriving.
    let held = api.creates.clone().try_acquire_many_owned(MAX_CONCURRENT_CREATES as u32).unwrap();
    let (status, problem) = post(&api, body(&targets, rest())).await;
    assert_eq!(status, 429, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("{MAX_CONCURRENT_CREATES} rollouts are being created at once")), "{detail}");
    assert!(api.store.list_rollouts(10).await.unwrap().is_empty(), "nothing was created");
    // One done: the next is taken; a refused and a created one give their
    // slot back.
    drop(held);
    let (status, created) = post(&api, body(&targets, rest())).await;
    assert_eq!(status, 201, "{created}");
    let (status, problem) = post(&api, body(&[], rest())).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(api.creates.available_permits(), MAX_CONCURRENT_CREATES);
    api.stop.trigger();
}
