//! The store conformance suite on PostgreSQL (`FLEETPATCH_TEST_DATABASE_URL`,
//! an admin connection, by default the local server): each test creates its
//! own database and drops it at the end. Without PostgreSQL the tests fail.

use fleetpatch_store::conformance::TestDatabase;
use fleetpatch_store::{redact_url, Error, Store, StoreOptions};
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("FLEETPATCH_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

fn url_of(admin: &str, database: &str) -> String {
    let slash = admin.rfind('/').unwrap_or_else(|| panic!("FLEETPATCH_TEST_DATABASE_URL {admin:?} names no database"));
    format!("{}/{database}", &admin[..slash])
}

async fn admin_execute(sql: String) {
    let admin = admin_url();
    let connection = Database::connect(&admin).await.unwrap_or_else(|error| {
        panic!(
            "the PostgreSQL tests need a server at {} (set FLEETPATCH_TEST_DATABASE_URL, or start one with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`): {error}",
            redact_url(&admin)
        )
    });
    connection.execute(Statement::from_string(DbBackend::Postgres, sql.clone())).await.unwrap_or_else(|error| {
        panic!("{sql}: {error}");
    });
    let _ = connection.close().await;
}

struct PostgresDatabase {
    name: String,
    store: Store,
}

impl PostgresDatabase {
    fn options(&self) -> StoreOptions {
        StoreOptions { url: url_of(&admin_url(), &self.name), max_connections: 8 }
    }
}

async fn create_database() -> String {
    let name = format!("fp_store_test_{}", uuid::Uuid::new_v4().simple());
    admin_execute(format!("CREATE DATABASE {name}")).await;
    name
}

async fn make_database() -> PostgresDatabase {
    let name = create_database().await;
    let options = StoreOptions { url: url_of(&admin_url(), &name), max_connections: 8 };
    let store = Store::connect(&options).await.expect("connect to the test database");
    store.migrate().await.expect("migrate");
    PostgresDatabase { name, store }
}

#[async_trait::async_trait]
impl TestDatabase for PostgresDatabase {
    fn store(&self) -> &Store {
        &self.store
    }

    async fn connect_another(&self) -> Store {
        Store::connect_migrated(&self.options()).await.expect("a second pool")
    }

    async fn tear_down(&self) {
        self.store.clone().close().await;
        admin_execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
    }
}

fleetpatch_store::store_conformance_suite!(make_database);

#[tokio::test]
async fn a_service_refuses_an_unmigrated_database_and_says_what_to_do() {
    let name = create_database().await;
    let options = StoreOptions { url: url_of(&admin_url(), &name), max_connections: 1 };
    let error = Store::connect_migrated(&options).await.err().expect("refused");
    admin_execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    assert!(matches!(error, Error::NotMigrated { .. }), "{error}");
    assert!(error.to_string().contains("run `fleetpatch migrate`"), "{error}");
}
