//! PostgreSQL only: how the collector's writes sit in PostgreSQL's storage
//! (migration 15). Called from the PostgreSQL test file alone.

use super::*;
use sea_orm::{ConnectionTrait, DbBackend, Statement};

/// The columns the collector's intake updates in place, per table.
const UPDATED_IN_PLACE: [(&str, &[&str]); 3] = [
    (
        "target_patches",
        &["state", "exit_code", "outcome", "reboot_required", "output_tail", "error", "started_at", "finished_at"],
    ),
    ("agent_heartbeats", &["count", "last_seq", "patch_index", "last_received_at"]),
    ("targets", &["last_seen_at"]),
];

async fn strings(store: &Store, sql: &str, table: &str) -> Vec<String> {
    let rows = store
        .db
        .query_all(Statement::from_sql_and_values(DbBackend::Postgres, sql, [table.into()]))
        .await
        .unwrap_or_else(|error| panic!("{sql}: {error}"));
    rows.iter().map(|row| row.try_get_by_index::<String>(0).expect("a text column")).collect()
}

/// A row of PostgreSQL's statistics, read again until `done` holds it (each
/// backend sends its counts within about a second of going idle) or 20 s
/// have passed; `sql` takes the table's name as `$1`.
async fn statistics<T>(
    store: &Store,
    sql: &str,
    table: &str,
    read: impl Fn(&sea_orm::QueryResult) -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let give_up = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let row = store
            .db
            .query_one(Statement::from_sql_and_values(DbBackend::Postgres, sql, [table.into()]))
            .await
            .expect("pg_stat_user_tables")
            .unwrap_or_else(|| panic!("no statistics for {table}"));
        let counts = read(&row);
        if done(&counts) || std::time::Instant::now() > give_up {
            return counts;
        }
        // Waiting for another server process to send its counts, not for our own code.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// (updates, heap-only updates) of `table` as PostgreSQL's statistics have
/// them, once they count at least `at_least`.
async fn updates(store: &Store, table: &str, at_least: i64) -> (i64, i64) {
    let sql = "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = $1";
    let read = |row: &sea_orm::QueryResult| -> (i64, i64) {
        (row.try_get_by_index(0).expect("n_tup_upd"), row.try_get_by_index(1).expect("hot"))
    };
    statistics(store, sql, table, read, |counts| counts.0 >= at_least).await
}

/// No column the collector updates in place is in an index of its table,
/// and `target_patches` and `agent_heartbeats` keep free space in their
/// pages, so PostgreSQL writes the reports' updates as heap-only tuples:
/// no new index entries per `started`, `finished` or heartbeat. Checked in
/// the catalog and in the statistics of a rollout's reports.
pub async fn the_collectors_updates_touch_no_index_and_stay_in_their_page(db: &dyn TestDatabase) {
    let store = db.store();
    assert_eq!(store.backend(), DbBackend::Postgres, "a PostgreSQL-only test");
    let indexed = "SELECT a.attname::text FROM pg_index i \
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                   WHERE i.indrelid = $1::regclass";
    for (table, columns) in UPDATED_IN_PLACE {
        let in_indexes = strings(store, indexed, table).await;
        for column in columns {
            assert!(!in_indexes.iter().any(|c| c == column), "{table}.{column} is in an index: {in_indexes:?}");
        }
        let options = "SELECT unnest(reloptions) FROM pg_class WHERE oid = $1::regclass";
        assert_eq!(strings(store, options, table).await, vec!["fillfactor=70".to_owned()], "{table}'s storage");
    }

    let id = create(store, Spec::new(2, 2, 2)).await;
    store.dispatch(id).await.expect("dispatch");
    let targets = all_targets(store, id).await;
    let mut running = Vec::new();
    for target in &targets {
        running.push(bring_to_running(store, target).await.target);
    }
    let intake = store.report_intake();
    let mut seq = 0;
    let mut next = |target: &Target, kind: ReportKind| {
        seq += 1;
        report(target, seq, kind)
    };
    // Each report its own batch, as a lightly loaded collector writes them.
    for patch_index in 0..2 {
        for target in &running {
            let batch = [
                next(target, ReportKind::Started { patch_index }),
                next(target, ReportKind::Heartbeat { patch_index: Some(patch_index) }),
                next(target, ReportKind::Heartbeat { patch_index: Some(patch_index) }),
                next(target, finished(patch_index, 0, PatchOutcomeKind::Installed, "ok")),
            ];
            for report in batch {
                assert_eq!(intake.apply_reports(&[report]).await.expect("apply"), vec![ReportResult::Accepted]);
            }
        }
    }
    for target in &running {
        let patches = store.target_patches(target.id).await.expect("patches");
        assert!(patches.iter().all(|p| p.state == PatchState::Succeeded), "{patches:?}");
    }
    // Two patches of two targets, each started then finished: 8 updates;
    // 2 runs × 4 heartbeats, the first of each run an insert: 6 updates.
    for (table, expected) in [("target_patches", 8), ("agent_heartbeats", 6)] {
        let (all, hot) = updates(store, table, expected).await;
        assert_eq!(all, expected, "{table}'s updates");
        assert_eq!(hot, all, "{table}: every update heap-only");
    }
}

/// The relay's claim finds the rows it claims by the outbox's primary key,
/// however many dead rows the queue holds (see [`crate::relay::CLAIM_POSTGRES`]):
/// in PostgreSQL's plan, the update's own scan of `outbox` (not the claim's
/// sub-select) is an index scan, never a sequential scan joined by hash.
pub async fn the_relays_claim_reads_the_outbox_by_its_key(db: &dyn TestDatabase) {
    let store = db.store();
    let run = |sql: &'static str| async move {
        store.db.execute_unprepared(sql).await.unwrap_or_else(|error| panic!("{sql}: {error}"));
    };
    // A queue after a busy hour: 20,000 messages published, 1,000 waiting, no vacuum yet.
    run("ALTER TABLE outbox SET (autovacuum_enabled = false)").await;
    run("INSERT INTO outbox (exchange, routing_key, payload, headers, created_at) \
         SELECT 'work', 'deploy', '\\x00', '{}', now() FROM generate_series(1, 20000)")
    .await;
    run("DELETE FROM outbox WHERE id % 20 <> 0").await;
    run("ANALYZE outbox").await;
    let explain = format!("EXPLAIN (FORMAT JSON) {}", crate::relay::CLAIM_POSTGRES);
    let values: [sea_orm::Value; 3] = [i64::MAX.into(), 0i64.into(), 500i64.into()];
    let row = store
        .db
        .query_one(Statement::from_sql_and_values(DbBackend::Postgres, &explain, values))
        .await
        .expect("explain the claim")
        .expect("a plan");
    let plan: serde_json::Value = row.try_get_by_index(0).expect("the plan as JSON");
    let update = &plan[0]["Plan"];
    assert_eq!(update["Node Type"], "ModifyTable", "{plan:#}");
    let scans: Vec<&serde_json::Value> = update["Plans"]
        .as_array()
        .expect("the update's inputs")
        .iter()
        .filter(|input| input["Parent Relationship"] != "InitPlan")
        .collect();
    assert_eq!(scans.len(), 1, "{plan:#}");
    let scan = scans[0]["Node Type"].as_str().expect("a node type");
    assert!(
        ["Index Scan", "Bitmap Heap Scan", "Index Only Scan"].contains(&scan),
        "the claim's update reads outbox by {scan}, not by its key: {plan:#}"
    );
    run("ALTER TABLE outbox RESET (autovacuum_enabled)").await;
}

/// A final result moves its target once in its batch's transaction, and
/// takes no lock on its rollout's row. Updated twice in one transaction (its
/// `last_seen_at` by the batch statement, then its state), the target had
/// its foreign key to `rollouts` checked again, and the check locked the
/// rollout's row (`KEY SHARE`): every writer finishing targets of the
/// rollout at once then shared that lock through a new MultiXact (see
/// `FINAL_FROM` in `ops/intake.rs`). The lock shows as the row's `xmax`.
pub async fn a_final_result_takes_no_lock_on_its_rollout(db: &dyn TestDatabase) {
    let store = db.store();
    assert_eq!(store.backend(), DbBackend::Postgres, "a PostgreSQL-only test");
    let id = create(store, Spec::new(1, 1, 1)).await;
    store.dispatch(id).await.expect("dispatch");
    let target = bring_to_running(store, &all_targets(store, id).await[0]).await.target;
    let rollout_xmax = || async {
        let sql = "SELECT xmax::text FROM rollouts WHERE id = $1";
        let row = store
            .db
            .query_one(Statement::from_sql_and_values(DbBackend::Postgres, sql, [id.into()]))
            .await
            .expect("the rollout's xmax")
            .expect("the rollout");
        row.try_get_by_index::<String>(0).expect("xmax as text")
    };
    let intake = store.report_intake();
    let started = report(&target, 1, ReportKind::Started { patch_index: 0 });
    assert_eq!(intake.apply_reports(&[started]).await.expect("started"), vec![ReportResult::Accepted]);
    let before = rollout_xmax().await;
    let received_from = chrono::Utc::now();
    let last = [
        report(&target, 2, finished(0, 0, PatchOutcomeKind::Installed, "ok")),
        report(&target, 3, ReportKind::Final { success: true, reboot_required: false, message: "done".into() }),
    ];
    let results = intake.apply_reports(&last).await.expect("the final result");
    assert_eq!(results, vec![ReportResult::Accepted, ReportResult::Accepted]);
    let after = store.target(target.id).await.expect("the target");
    assert_eq!(after.state, TargetState::Succeeded);
    let seen = after.last_seen_at.expect("the final result set the last-seen time");
    assert!(seen >= received_from, "last seen {seen}, the batch was received from {received_from}");
    assert_eq!(rollout_xmax().await, before, "the batch locked the rollout's row");
}

/// The intake reads each heartbeat's stored run by `agent_heartbeats`'
/// primary key, whatever PostgreSQL knows of the table's size: in a new
/// database the table was never analyzed, and a join planned then hashed a
/// sequential scan of the whole table for every batch with heartbeats (see
/// `POSTGRES_CTES` in `ops/heartbeats.rs`).
pub async fn heartbeats_find_their_run_by_its_key_in_a_new_database(db: &dyn TestDatabase) {
    let store = db.store();
    assert_eq!(store.backend(), DbBackend::Postgres, "a PostgreSQL-only test");
    let id = create(store, Spec::new(4, 1, 4)).await;
    store.dispatch(id).await.expect("dispatch");
    let mut running = Vec::new();
    for target in all_targets(store, id).await {
        running.push(bring_to_running(store, &target).await.target);
    }
    let intake = store.report_intake();
    for seq in 1..=3 {
        let beats: Vec<IncomingReport> =
            running.iter().map(|t| report(t, seq, ReportKind::Heartbeat { patch_index: Some(0) })).collect();
        let results = intake.apply_reports(&beats).await.expect("heartbeats");
        assert!(results.iter().all(|r| *r == ReportResult::Accepted), "{results:?}");
    }
    // Rows read by sequential scans: the migrations' scans of the empty
    // table read none; a batch's scan reads the runs stored before it.
    let sql = "SELECT seq_tup_read, COALESCE(idx_scan, 0), last_analyze IS NULL AND last_autoanalyze IS NULL \
               FROM pg_stat_user_tables WHERE relname = $1";
    let read = |row: &sea_orm::QueryResult| -> (i64, i64, bool) {
        (
            row.try_get_by_index(0).expect("seq_tup_read"),
            row.try_get_by_index(1).expect("idx_scan"),
            row.try_get_by_index(2).expect("analyzed"),
        )
    };
    let (read_sequentially, by_index, never_analyzed) =
        statistics(store, sql, "agent_heartbeats", read, |counts| counts.0 > 0 || counts.1 >= 3).await;
    assert!(never_analyzed, "the case under test: a table PostgreSQL knows nothing about yet");
    assert_eq!(read_sequentially, 0, "the batches read all of agent_heartbeats");
    assert!(by_index >= 3, "the batches read agent_heartbeats by its key: {by_index} index scans");
}
