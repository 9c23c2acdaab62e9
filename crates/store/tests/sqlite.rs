//! The store conformance suite on SQLite (the embedded default of
//! `fleetpatch demo`): a fresh database file per test.
//!
//! Each store is a pool of several connections to a database file in WAL
//! mode, and "another process" is a second pool on the same file, so racing
//! operations really run at once: SQLite lets one writer in at a time, and
//! the store's write transactions take the write lock first (see
//! `Store::begin`), so they wait for each other instead of failing with
//! `SQLITE_BUSY`.

use fleetpatch_store::conformance::TestDatabase;
use fleetpatch_store::{Error, Store, StoreOptions};

struct SqliteDatabase {
    dir: std::path::PathBuf,
    store: Store,
}

/// One connection, as the demo runs it: an operation that reads through the
/// store's pool while its own transaction holds the only connection waits
/// for ever there (and fails here, when the pool gives up).
fn options(dir: &std::path::Path) -> StoreOptions {
    StoreOptions { url: format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display()), max_connections: 1 }
}

async fn make_database() -> SqliteDatabase {
    let dir = std::env::temp_dir().join(format!("fp-store-sqlite-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create the test directory");
    let store = Store::connect(&options(&dir)).await.expect("open the SQLite database");
    store.migrate().await.expect("migrate");
    SqliteDatabase { dir, store }
}

#[async_trait::async_trait]
impl TestDatabase for SqliteDatabase {
    fn store(&self) -> &Store {
        &self.store
    }

    async fn connect_another(&self) -> Store {
        Store::connect(&options(&self.dir)).await.expect("a second pool on the same database file")
    }

    async fn tear_down(&self) {
        self.store.clone().close().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fleetpatch_store::store_conformance_suite!(make_database);

#[tokio::test]
async fn a_service_refuses_an_unmigrated_database_and_says_what_to_do() {
    let dir = std::env::temp_dir().join(format!("fp-store-sqlite-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let error = Store::connect_migrated(&options(&dir)).await.err().expect("refused");
    assert!(matches!(error, Error::NotMigrated { .. }), "{error}");
    assert!(error.to_string().contains("run `fleetpatch migrate`"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}
