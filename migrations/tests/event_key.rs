//! Migration 16 (`agent_events` keyed by the report) on both databases:
//! the rows written before it are kept, the key refuses a second row of
//! one report, an event no longer needs a target row (the intake checks
//! that, see the store's conformance suite), and going back restores the
//! surrogate id with the rows. PostgreSQL: `FLEETPATCH_TEST_DATABASE_URL`
//! (an admin connection, by default the local server); without it the test fails.

use fleetpatch_migrations::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};

/// The migrations before this one.
const BEFORE: u32 = 15;

fn insert(backend: DbBackend, target: &str, seq: i64) -> Statement {
    Statement::from_string(
        backend,
        format!(
            "INSERT INTO agent_events (target_id, attempt, agent_instance, seq, kind, received_at) \
             VALUES ('{target}', 1, 7, {seq}, 'started', '2026-12-05T00:00:00Z')"
        ),
    )
}

async fn seqs(db: &DatabaseConnection) -> Vec<i64> {
    let rows = db
        .query_all(Statement::from_string(db.get_database_backend(), "SELECT seq FROM agent_events ORDER BY seq"))
        .await
        .expect("select");
    rows.iter().map(|row| row.try_get::<i64>("", "seq").expect("seq")).collect()
}

async fn the_event_key_migration(db: &DatabaseConnection) {
    let backend = db.get_database_backend();
    Migrator::up(db, Some(BEFORE)).await.expect("up to migration 15");
    // Rows of a target this test does not create: foreign keys off for the session.
    let (off, on) = match backend {
        DbBackend::Postgres => ("SET session_replication_role = replica", "SET session_replication_role = origin"),
        _ => ("PRAGMA foreign_keys = OFF", "PRAGMA foreign_keys = ON"),
    };
    db.execute_unprepared(off).await.expect("foreign keys off");
    let target = "6f1c0c35-7d0e-4f59-9d43-3b0c1a8e2b11";
    for seq in [1, 2] {
        db.execute(insert(backend, target, seq)).await.expect("an event before the migration");
    }
    db.execute_unprepared(on).await.expect("foreign keys on");

    Migrator::up(db, None).await.expect("migration 16");
    assert_eq!(seqs(db).await, vec![1, 2], "the rows are kept");
    let again = db.execute(insert(backend, target, 2)).await.expect_err("a second row of one report");
    assert!(again.to_string().to_lowercase().contains("unique"), "{again}");
    db.execute(insert(backend, "0a5c7d2e-1b3f-4c6d-8e9f-a0b1c2d3e4f5", 1)).await.expect("no foreign key");
    let id = db.query_all(Statement::from_string(backend, "SELECT id FROM agent_events")).await;
    assert!(id.is_err(), "no surrogate id");

    db.execute_unprepared(off).await.expect("foreign keys off");
    Migrator::down(db, Some(1)).await.expect("back to migration 15");
    db.execute_unprepared(on).await.expect("foreign keys on");
    assert_eq!(seqs(db).await, vec![1, 1, 2]);
    let ids = db.query_all(Statement::from_string(backend, "SELECT id FROM agent_events")).await.expect("ids");
    assert_eq!(ids.len(), 3, "every row has its id again");
    let again = db.execute(insert(backend, target, 2)).await.expect_err("the idempotency index is back");
    assert!(again.to_string().to_lowercase().contains("unique"), "{again}");
}

#[tokio::test]
async fn the_event_key_migration_on_sqlite() {
    let path = std::env::temp_dir().join(format!("fp-migrations-{}.sqlite", uuid::Uuid::new_v4().simple()));
    let mut options = sea_orm_migration::sea_orm::ConnectOptions::new(format!("sqlite://{}?mode=rwc", path.display()));
    options.max_connections(1).sqlx_logging(false);
    let db = Database::connect(options).await.expect("sqlite");
    the_event_key_migration(&db).await;
    db.close().await.expect("close");
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn the_event_key_migration_on_postgres() {
    let admin_url = std::env::var("FLEETPATCH_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let admin = Database::connect(&admin_url).await.unwrap_or_else(|error| {
        panic!("this test needs PostgreSQL at FLEETPATCH_TEST_DATABASE_URL or the local server: {error}")
    });
    let name = format!("fp_migrations_{}", uuid::Uuid::new_v4().simple());
    admin.execute_unprepared(&format!("CREATE DATABASE {name}")).await.expect("create database");
    let Some((server, _)) = admin_url.rsplit_once('/') else { panic!("{admin_url} names no database") };
    // One connection: the session settings hold for every statement.
    let mut options = sea_orm_migration::sea_orm::ConnectOptions::new(format!("{server}/{name}"));
    options.max_connections(1).sqlx_logging(false);
    let db = Database::connect(options).await.expect("the test database");
    the_event_key_migration(&db).await;
    db.close().await.expect("close");
    admin.execute_unprepared(&format!("DROP DATABASE {name}")).await.expect("drop database");
}
