//! What the store's benches share: a private PostgreSQL database on the
//! server of `FLEETPATCH_TEST_DATABASE_URL` (an admin connection), migrated,
//! and dropped at the end.

use fleetpatch_store::*;
use uuid::Uuid;

/// The migrated store on a new private database, and how to drop it.
pub async fn private_postgres() -> (Store, PrivateDatabase) {
    let admin = StoreOptions {
        url: std::env::var("FLEETPATCH_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        max_connections: 4,
    };
    let name = format!("fp_bench_{}", Uuid::new_v4().simple());
    let options = create_sibling_database(&admin, &name).await.unwrap_or_else(|error| {
        panic!("this bench needs PostgreSQL at FLEETPATCH_TEST_DATABASE_URL ({}): {error}", redact_url(&admin.url))
    });
    let store = Store::connect(&options).await.expect("connect");
    store.migrate().await.expect("migrate");
    (store, PrivateDatabase { admin, name })
}

/// A bench's private database.
pub struct PrivateDatabase {
    admin: StoreOptions,
    name: String,
}

impl PrivateDatabase {
    /// Closes `store` and drops the database.
    pub async fn drop_with(self, store: Store) {
        store.close().await;
        drop_sibling_database(&self.admin, &self.name).await.expect("drop the bench database");
    }
}
