//! The watchdog decides by the store's clock: with a manual clock, a 600 s
//! timeout is checked at exact instants and the test takes no time. The
//! timers are handed to the watchdog as the bus delivers them once due; the
//! bus's own delays (wall time) are the end-to-end tests' business
//! (`tests/tests/pipeline.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleetpatch_bus::memory::MemoryBackend;
use fleetpatch_bus::{Bus, Outgoing};
use fleetpatch_proto::plan::InstallerKind;
use fleetpatch_proto::routing;
use fleetpatch_proto::state::{PatchState, TargetState};
use fleetpatch_proto::v1;
use fleetpatch_proto::Message;
use fleetpatch_runtime::ManualClock;
use fleetpatch_store::{
    Claim, NewPatch, NewRollout, NewTarget, RolloutSettings, Store, StoreOptions, Target, TimeoutPolicy, WaveSpec,
};
use tokio::sync::Notify;

use super::Core;

const TIMEOUT_SECONDS: u32 = 600;

struct Fixture {
    dir: std::path::PathBuf,
    core: Core,
    consumer: fleetpatch_bus::Consumer,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn fixture(manual: &ManualClock) -> Fixture {
    let dir = std::env::temp_dir().join(format!("fp-scheduler-watchdog-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create the test directory");
    let url = format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display());
    let store = Store::connect(&StoreOptions { url, max_connections: 1 }).await.expect("open SQLite");
    store.migrate().await.expect("migrate");
    let store = store.with_clock(manual.clock());
    let bus = Bus::new(Arc::new(MemoryBackend::new(&routing::WORK_QUEUES, 10)));
    let consumer = bus.consume(routing::WATCH, 16).await.expect("consume the watch queue");
    let core = Core {
        store,
        bus,
        nudge: Arc::new(Notify::new()),
        policy: TimeoutPolicy { verify_delay: Duration::from_secs(1800) },
        dispatching: Arc::default(),
        stuck_job_after: Duration::from_secs(900),
    };
    Fixture { dir, core, consumer }
}

/// One target with one patch, brought to `running` as a worker would.
async fn running_target(store: &Store) -> Target {
    let id = store
        .create_rollout(NewRollout {
            name: "watchdog".into(),
            concurrency: 1,
            timeout_seconds: TIMEOUT_SECONDS,
            waves: vec![WaveSpec::new("all", None, 100.0)],
            settings: RolloutSettings::default(),
            patches: vec![NewPatch {
                name: "KB5030211".into(),
                kb: Some("KB5030211".into()),
                file: "kb5030211.msu".into(),
                sha256: format!("{:064x}", 1),
                size: 1,
                installer: InstallerKind::Msu,
                arguments: "/quiet".into(),
                success_codes: vec![0],
                reboot_codes: vec![3010],
                timeout_seconds: 300,
                detection: None,
            }],
            targets: vec![NewTarget {
                host: "host-1".into(),
                port: None,
                transport: "sim".into(),
                labels: BTreeMap::new(),
                credential: None,
                wave: 0,
            }],
        })
        .await
        .expect("create");
    assert_eq!(store.dispatch(id).await.expect("dispatch").dispatched, 1);
    let target = store.targets(id, None, None, 1).await.expect("targets").remove(0);
    let Claim::Claimed(context) = store.claim_deploy(target.id, 1, false, "nonce").await.expect("claim") else {
        panic!("the target could not be claimed");
    };
    store.record_probe(&context, "Windows", "x86_64", serde_json::json!({}), &[], "hash").await.expect("probe");
    assert!(store.mark_installing(&context.target, "push").await.expect("installing"));
    assert!(store.mark_running(&context.target).await.expect("running"));
    store.target(target.id).await.expect("target")
}

/// Hands the watchdog one timer for `target`, as the bus delivers it when due.
async fn fire_timer(fixture: &mut Fixture, target: &Target, due: chrono::DateTime<chrono::Utc>) {
    let timer = v1::WatchTimer {
        target_id: target.id.to_string(),
        attempt: target.attempt,
        due_at_unix_ms: due.timestamp_millis(),
    };
    fixture.core.bus.publish(vec![Outgoing::work(routing::WATCH, timer.encode_to_vec())]).await.expect("publish");
    let delivery = tokio::time::timeout(Duration::from_secs(10), fixture.consumer.next())
        .await
        .expect("the timer is delivered")
        .expect("the consumer is open");
    fixture.core.watch_batch(vec![delivery]).await;
}

#[tokio::test]
async fn the_watchdog_times_a_target_out_exactly_at_its_deadline_by_the_stores_clock() {
    let manual = ManualClock::starting_now();
    let mut fixture = fixture(&manual).await;
    let store = fixture.core.store.clone();
    let target = running_target(&store).await;
    let started = manual.now();
    assert_eq!(target.last_seen_at, Some(started));
    let deadline = started + chrono::Duration::seconds(i64::from(TIMEOUT_SECONDS));

    // A millisecond before the deadline (the wall clock has hardly moved), the target is in time.
    manual.set(deadline - chrono::Duration::milliseconds(1));
    fire_timer(&mut fixture, &target, deadline).await;
    assert_eq!(store.target(target.id).await.expect("target").state, TargetState::Running);

    // At the deadline it times out, at that instant, with its open patch failed.
    manual.set(deadline);
    fire_timer(&mut fixture, &target, deadline).await;
    let timed_out = store.target(target.id).await.expect("target");
    assert_eq!(timed_out.state, TargetState::TimedOut);
    assert_eq!(timed_out.finished_at, Some(deadline));
    let reason = "no feedback received within 600 s; the deployment may have failed";
    assert_eq!(timed_out.error.as_deref(), Some(reason));
    let patches = store.target_patches(target.id).await.expect("patches");
    assert_eq!((patches[0].state, patches[0].error.as_deref()), (PatchState::Failed, Some(reason)));

    // A late duplicate of the timer changes nothing.
    manual.advance(Duration::from_secs(3600));
    fire_timer(&mut fixture, &target, deadline).await;
    assert_eq!(store.target(target.id).await.expect("target"), timed_out);
    store.close().await;
}
