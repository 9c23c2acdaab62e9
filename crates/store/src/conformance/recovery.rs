//! The reconciler's queries, verification verdicts, tokens and the outbox relay.

use super::*;

fn deploy_job_targets(messages: &[fleetpatch_bus::Outgoing]) -> Vec<String> {
    messages.iter().map(|m| v1::DeployJob::decode(m.payload.as_slice()).expect("a DeployJob").target_id).collect()
}

pub async fn reconciler_finds_targets_whose_job_was_lost_oldest_first_and_paged(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(4, 1, 4)).await;
    store.dispatch(id).await.expect("dispatch");
    let targets = all_targets(store, id).await;
    // One target moves on to probing (a worker claimed it, then died), one runs.
    let Claim::Claimed(_) = store.claim_deploy(targets[0].id, 1, false, "nonce").await.expect("claim") else {
        panic!("claimable");
    };
    bring_to_running(store, &targets[1]).await;
    assert!(store.stuck_in_flight_targets(Duration::from_secs(60), 10).await.expect("stuck").is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stuck =
        deploy_job_targets(&store.stuck_in_flight_targets(Duration::from_millis(200), 10).await.expect("stuck"));
    let mut expected: Vec<String> = [0, 2, 3].iter().map(|i| targets[*i].id.to_string()).collect();
    expected.sort();
    let mut found = stuck.clone();
    found.sort();
    assert_eq!(found, expected, "queued and probing targets without progress; not the running one");
    let first = deploy_job_targets(&store.stuck_in_flight_targets(Duration::from_millis(200), 1).await.expect("stuck"));
    assert_eq!(first, vec![stuck[0].clone()], "the limit holds, oldest first");
    let job = v1::DeployJob::decode(
        store.stuck_in_flight_targets(Duration::from_millis(200), 10).await.expect("stuck")[0].payload.as_slice(),
    )
    .expect("a DeployJob");
    assert_eq!((job.attempt, job.rollout_id), (1, id.to_string()), "the job names the attempt and rollout");
}

pub async fn reconciler_finds_rollouts_with_pending_targets_by_page(db: &dyn TestDatabase) {
    let store = db.store();
    let mut with_pending = Vec::new();
    for _ in 0..3 {
        let id = create(store, Spec::new(2, 1, 1)).await;
        store.dispatch(id).await.expect("dispatch");
        with_pending.push(id);
    }
    // All dispatched: nothing pending.
    let full = create(store, Spec::new(1, 1, 1)).await;
    store.dispatch(full).await.expect("dispatch");
    // Paused with pending targets: not running, left alone.
    let paused = create(store, Spec::new(2, 1, 1)).await;
    store.pause_rollout(paused, "test").await.expect("pause");
    with_pending.sort();
    let all = store.rollouts_with_pending_targets(None, 100).await.expect("pending");
    assert_eq!(all.iter().filter(|id| with_pending.contains(id)).count(), 3);
    assert!(!all.contains(&full) && !all.contains(&paused), "{all:?}");
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store.rollouts_with_pending_targets(after, 1).await.expect("page");
        let Some(last) = page.last().copied() else { break };
        assert_eq!(page.len(), 1, "the limit holds");
        paged.extend(page);
        after = Some(last);
    }
    assert_eq!(paged, all, "pages walk every rollout once, in id order");
}

pub async fn reconciler_finds_every_overdue_running_target_across_pages(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec { timeout_seconds: 1, ..Spec::new(5, 1, 5) }).await;
    store.dispatch(id).await.expect("dispatch");
    let targets = all_targets(store, id).await;
    let mut running = Vec::new();
    for target in &targets {
        running.push(bring_to_running(store, target).await.target.id);
    }
    assert!(store.overdue_running_deadlines(Duration::ZERO, 2, 100).await.expect("overdue").is_empty());
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // Pages of 2 over 5 targets: all are found, not the first page only.
    let overdue = store.overdue_running_deadlines(Duration::ZERO, 2, 100).await.expect("overdue");
    let mut found: Vec<Uuid> = overdue.iter().map(|t| t.target_id).collect();
    found.sort();
    running.sort();
    assert_eq!(found, running);
    assert!(overdue.iter().all(|t| t.attempt == 1));
    assert_eq!(store.overdue_running_deadlines(Duration::ZERO, 2, 3).await.expect("overdue").len(), 3, "limit");
    assert!(store.overdue_running_deadlines(Duration::from_secs(60), 2, 100).await.expect("overdue").is_empty());
}

pub async fn verification_verdicts_are_recorded_per_attempt(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(1, 3, 1)).await;
    let target = all_targets(store, id).await.remove(0);
    store.record_verification(target.id, 1, &[0], &[1, 2], &[]).await.expect("verify");
    let verified = store.target(target.id).await.expect("target");
    assert_eq!(verified.verified_state.as_deref(), Some("missing #1, #2"));
    assert!(verified.verified_at.is_some());
    store.record_verification(target.id, 1, &[], &[0, 1, 2], &[]).await.expect("verify");
    assert_eq!(store.target(target.id).await.expect("target").verified_state.as_deref(), Some("none_installed"));
    store.record_verification(target.id, 1, &[0, 1, 2], &[], &[]).await.expect("verify");
    assert_eq!(store.target(target.id).await.expect("target").verified_state.as_deref(), Some("all_installed"));
    // A scan of another attempt does not overwrite this one's.
    store.record_verification(target.id, 9, &[], &[0, 1, 2], &[]).await.expect("verify");
    assert_eq!(store.target(target.id).await.expect("target").verified_state.as_deref(), Some("all_installed"));
}

pub async fn token_info_names_the_attempt(db: &dyn TestDatabase) {
    let store = db.store();
    let id = create(store, Spec::new(1, 1, 1)).await;
    let target = all_targets(store, id).await.remove(0);
    assert_eq!(
        store.report_intake().token_info(target.id).await.expect("token info"),
        None,
        "no token before the probe"
    );
    store.dispatch(id).await.expect("dispatch");
    bring_to_running(store, &target).await;
    let info = store.report_intake().token_info(target.id).await.expect("token info").expect("a token after the probe");
    let nonce = store.target(target.id).await.expect("target").token_nonce.expect("a nonce after the claim");
    assert_eq!(
        info,
        TokenInfo {
            token_hash: "hash".into(),
            token_nonce: nonce,
            attempt: 1,
            rollout_id: id,
            state: TargetState::Running
        }
    );
    assert_eq!(store.report_intake().token_info(Uuid::new_v4()).await.expect("token info"), None);
    // Many at once: the known ones with a token, nothing for the others.
    let unknown = Uuid::new_v4();
    let infos = store.report_intake().token_infos(&[unknown, target.id, target.id]).await.expect("token infos");
    assert_eq!(infos, std::collections::HashMap::from([(target.id, info)]));
    assert!(store.report_intake().token_infos(&[]).await.expect("none").is_empty());
}

pub async fn relay_publishes_in_commit_order_and_empties_the_outbox(db: &dyn TestDatabase) {
    let store = db.store();
    let backend = std::sync::Arc::new(fleetpatch_bus::memory::MemoryBackend::new(&routing::WORK_QUEUES, 5));
    let bus = fleetpatch_bus::Bus::new(backend);
    let ids = [create(store, Spec::new(1, 0, 1)).await, create(store, Spec::new(1, 0, 1)).await];
    let mut consumer = bus.consume(routing::DISPATCH, 10).await.expect("consume");
    assert_eq!(store.relay_outbox(&bus, 1).await.expect("relay"), 1, "the limit holds");
    assert_eq!(store.relay_outbox(&bus, 100).await.expect("relay"), 1);
    assert_eq!(store.relay_outbox(&bus, 100).await.expect("relay"), 0);
    assert_eq!(store.outbox_depth().await.expect("depth"), 0);
    for expected in ids {
        let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("a dispatch request arrives")
            .expect("consumer open");
        let request = v1::DispatchRequest::decode(delivery.payload.as_slice()).expect("a DispatchRequest");
        assert_eq!(request.rollout_id, expected.to_string(), "commit order");
        delivery.ack().await.expect("ack");
    }
    // A bus that refuses the messages leaves them in the outbox.
    bus.close().await;
    store.enqueue(vec![fleetpatch_bus::Outgoing::work(routing::DISPATCH, vec![1, 2, 3])]).await.expect("enqueue");
    assert!(store.relay_outbox(&bus, 100).await.is_err(), "publishing on a closed bus fails");
    assert_eq!(store.outbox_depth().await.expect("depth"), 1, "nothing is lost");
    assert_eq!(outbox(store).await[0].payload, vec![1, 2, 3]);
}

/// The relay's loop: a nudge drains the outbox across as many passes as it
/// takes (more rows than one pass claims), in commit order, after its
/// gathering window; what is committed without a nudge goes out in the last
/// pass at shutdown.
pub async fn the_relay_loop_drains_what_a_nudge_announces_across_passes_and_the_rest_at_shutdown(
    db: &dyn TestDatabase,
) {
    let store = db.store();
    drain_outbox(store).await;
    let backend = std::sync::Arc::new(fleetpatch_bus::memory::MemoryBackend::new(&routing::WORK_QUEUES, 5));
    let bus = fleetpatch_bus::Bus::new(backend);
    let mut consumer = bus.consume(routing::DISPATCH, 2_000).await.expect("consume");
    let nudge = std::sync::Arc::new(tokio::sync::Notify::new());
    let stop = tokio_util::sync::CancellationToken::new();
    // No periodic pass within the test (an hour): only the nudge and the shutdown publish.
    let relay = tokio::spawn(crate::relay::run_relay(
        store.clone(),
        bus.clone(),
        nudge.clone(),
        Duration::from_secs(3_600),
        Duration::from_millis(20),
        stop.clone(),
    ));
    let count = 1_200u32;
    let messages = (0..count).map(|i| fleetpatch_bus::Outgoing::work(routing::DISPATCH, i.to_be_bytes().to_vec()));
    store.enqueue(messages.collect()).await.expect("enqueue");
    nudge.notify_one();
    for expected in 0..count {
        let delivery = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("message {expected} of {count} was not published"))
            .expect("consumer open");
        assert_eq!(delivery.payload, expected.to_be_bytes().to_vec(), "commit order");
        delivery.ack().await.expect("ack");
    }
    // The relay deletes a pass's rows once the broker confirmed them, just
    // after the consumer may have received the last one.
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    while store.outbox_depth().await.expect("depth") > 0 && std::time::Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.outbox_depth().await.expect("depth"), 0, "every published row deleted");
    // Committed with no nudge: the shutdown's last pass publishes it.
    store.enqueue(vec![fleetpatch_bus::Outgoing::work(routing::DISPATCH, vec![9])]).await.expect("enqueue");
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), relay).await.expect("the relay stops").expect("no panic");
    let last = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("the last message is published at shutdown")
        .expect("consumer open");
    assert_eq!(last.payload, vec![9]);
    assert_eq!(store.outbox_depth().await.expect("depth"), 0);
}

/// A broker that never confirms: every publish hangs.
struct HangingBroker;

#[async_trait::async_trait]
impl fleetpatch_bus::Backend for HangingBroker {
    async fn publish(&self, _: fleetpatch_bus::Route, _: Vec<fleetpatch_bus::Wire>) -> fleetpatch_bus::Result<()> {
        std::future::pending().await
    }
    async fn consume(&self, _: &str, _: u16) -> fleetpatch_bus::Result<fleetpatch_bus::BackendConsumer> {
        Err(fleetpatch_bus::Error::Closed)
    }
    async fn hold_dead_letters(&self, _: usize) -> fleetpatch_bus::Result<fleetpatch_bus::HeldDeadLetters> {
        Ok(fleetpatch_bus::HeldDeadLetters { letters: vec![], hold: Box::new(fleetpatch_bus::NothingHeld) })
    }
    async fn queue_depth(&self, _: &str) -> fleetpatch_bus::Result<u64> {
        Ok(0)
    }
    fn is_healthy(&self) -> bool {
        true
    }
    async fn close(&self) {}
}

async fn claimed_rows(store: &Store) -> i64 {
    let sql = "SELECT COUNT(*) AS n FROM outbox WHERE claimed_until_ms IS NOT NULL";
    let row = store.db.query_one(sea_orm::Statement::from_string(store.backend(), sql.to_owned())).await;
    row.expect("count claims").expect("a row").try_get::<i64>("", "n").expect("n")
}

pub async fn relay_claims_rows_with_a_lease_and_holds_no_transaction_while_publishing(db: &dyn TestDatabase) {
    use sea_orm::ConnectionTrait;
    let store = db.store();
    drain_outbox(store).await;
    store.enqueue(vec![fleetpatch_bus::Outgoing::work(routing::DISPATCH, vec![7])]).await.expect("enqueue");
    // A relay whose broker hangs (a blocked RabbitMQ) ...
    let hanging = fleetpatch_bus::Bus::new(std::sync::Arc::new(HangingBroker));
    let stuck = {
        let store = store.clone();
        tokio::spawn(async move { store.relay_outbox(&hanging, 100).await })
    };
    // ... has committed its claim before publishing: another connection sees it.
    let mut seen = 0;
    for _ in 0..200 {
        seen = claimed_rows(store).await;
        if seen == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, 1, "the claim is committed while the publish hangs (no transaction spans the broker call)");
    // Another relay skips the claimed row, without waiting for the stuck one.
    let backend = std::sync::Arc::new(fleetpatch_bus::memory::MemoryBackend::new(&routing::WORK_QUEUES, 5));
    let bus = fleetpatch_bus::Bus::new(backend);
    let quick = tokio::time::timeout(Duration::from_secs(5), store.relay_outbox(&bus, 100)).await;
    assert_eq!(quick.expect("a second relay is not blocked").expect("relay"), 0, "a claimed row is not taken");
    // The stuck relay dies; once its lease has run out, the row is published again.
    stuck.abort();
    let expired = fleetpatch_bus::now_unix_ms() - 1;
    store
        .db
        .execute(sea_orm::Statement::from_string(
            store.backend(),
            format!("UPDATE outbox SET claimed_until_ms = {expired}"),
        ))
        .await
        .expect("expire the lease");
    let mut consumer = bus.consume(routing::DISPATCH, 10).await.expect("consume");
    assert_eq!(store.relay_outbox(&bus, 100).await.expect("relay"), 1, "an expired claim is taken again");
    let delivery = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.expect("arrives").expect("open");
    assert_eq!(delivery.payload, vec![7]);
    assert_eq!(store.outbox_depth().await.expect("depth"), 0);
    assert_eq!(claimed_rows(store).await, 0);
}
