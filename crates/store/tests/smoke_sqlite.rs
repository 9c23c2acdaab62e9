use fleetpatch_store::*;

#[tokio::test]
async fn sqlite_runs_the_migrations_and_dispatch() {
    let dir = std::env::temp_dir().join(format!("fp-sqlite-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display());
    let store = Store::connect(&StoreOptions { url, max_connections: 1 }).await.unwrap();
    store.migrate().await.unwrap();
    store.check_migrated().await.unwrap();
    let id = store
        .create_rollout(NewRollout {
            name: "r".into(),
            concurrency: 2,
            timeout_seconds: 10,
            waves: vec![WaveSpec { name: "all".into(), size: None, max_failure_percent: 100.0 }],
            settings: RolloutSettings::default(),
            patches: vec![],
            targets: (0..3)
                .map(|i| NewTarget {
                    host: format!("h{i}"),
                    port: None,
                    transport: "sim".into(),
                    labels: Default::default(),
                    credential_ref: None,
                    wave: 0,
                })
                .collect(),
        })
        .await
        .unwrap();
    let outcome = store.dispatch(id).await.unwrap();
    assert_eq!(outcome.dispatched, 2);
    let targets = store.targets(id, None, None, 10).await.unwrap();
    assert_eq!(targets.iter().filter(|t| t.state == fleetpatch_proto::state::TargetState::Queued).count(), 2);
}

#[tokio::test]
async fn a_service_refuses_an_unmigrated_database_and_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("fp-sqlite-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display());
    let error = Store::connect_migrated(&StoreOptions { url, max_connections: 1 }).await.err().expect("refused");
    assert!(matches!(error, Error::NotMigrated { .. }), "{error}");
    assert!(error.to_string().contains("run `fleetpatch migrate`"), "{error}");
}
