//! The store conformance suite on PostgreSQL (`FLEETPATCH_TEST_DATABASE_URL`,
//! an admin connection, by default the local server): each test creates its
//! own database and drops it at the end. Without PostgreSQL the tests fail.

use fleetpatch_store::conformance::TestDatabase;
use fleetpatch_store::{create_sibling_database, drop_sibling_database, redact_url, Error, Store, StoreOptions};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin() -> StoreOptions {
    let url = std::env::var("FLEETPATCH_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    StoreOptions { url, max_connections: 8 }
}

/// A new empty database; its options.
async fn create_database() -> (String, StoreOptions) {
    let name = format!("fp_store_test_{}", uuid::Uuid::new_v4().simple());
    let options = create_sibling_database(&admin(), &name).await.unwrap_or_else(|error| {
        panic!(
            "the PostgreSQL tests need a server at {} (set FLEETPATCH_TEST_DATABASE_URL, or start one with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`): {error}",
            redact_url(&admin().url)
        )
    });
    (name, options)
}

async fn drop_database(name: &str) {
    drop_sibling_database(&admin(), name).await.unwrap_or_else(|error| panic!("dropping {name}: {error}"));
}

struct PostgresDatabase {
    name: String,
    options: StoreOptions,
    store: Store,
}

async fn make_database() -> PostgresDatabase {
    let (name, options) = create_database().await;
    let store = Store::connect(&options).await.expect("connect to the test database");
    store.migrate().await.expect("migrate");
    PostgresDatabase { name, options, store }
}

#[async_trait::async_trait]
impl TestDatabase for PostgresDatabase {
    fn store(&self) -> &Store {
        &self.store
    }

    async fn connect_another(&self) -> Store {
        Store::connect_migrated(&self.options).await.expect("a second pool")
    }

    async fn tear_down(&self) {
        self.store.clone().close().await;
        drop_database(&self.name).await;
    }
}

fleetpatch_store::store_conformance_suite!(make_database);

/// The store's PostgreSQL-only contracts (`conformance/postgres.rs`), each
/// on a database of its own.
macro_rules! postgres_only {
    (#[$test:meta] $($name:ident),+ $(,)?) => {$(
        #[$test]
        async fn $name() {
            use fleetpatch_store::conformance;
            let database = make_database().await;
            conformance::run(&database, conformance::$name(&database)).await;
        }
    )+};
}

postgres_only!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    the_collectors_updates_touch_no_index_and_stay_in_their_page
);
postgres_only!(
    #[tokio::test]
    the_relays_claim_reads_the_outbox_by_its_key,
    a_final_result_takes_no_lock_on_its_rollout,
    heartbeats_find_their_run_by_its_key_in_a_new_database,
);

#[tokio::test]
async fn a_service_refuses_an_unmigrated_database_and_says_what_to_do() {
    let (name, options) = create_database().await;
    let error = Store::connect_migrated(&options).await.err().expect("refused");
    drop_database(&name).await;
    assert!(matches!(error, Error::NotMigrated { .. }), "{error}");
    assert!(error.to_string().contains("run `fleetpatch migrate`"), "{error}");
}

#[tokio::test]
async fn the_dispatch_floor_writes_the_same_rows_every_round_and_drops_its_tables() {
    use fleetpatch_store::ceiling::DispatchFloor;
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let database = make_database().await;
    let store = &database.store;
    let sql = sea_orm::Database::connect(&database.options.url).await.expect("a plain connection");
    let count = |query: &'static str| {
        let sql = &sql;
        async move {
            let row = sql.query_one(Statement::from_string(DbBackend::Postgres, query)).await.expect(query);
            row.expect("a row").try_get_by_index::<i64>(0).expect("a count")
        }
    };
    let floor = DispatchFloor::create(store, 700).await.expect("the scratch tables");
    // Every round starts from empty tables and leaves 700 queued rows and
    // their 700 history rows, however many rounds ran before.
    for _ in 0..3 {
        floor.run(store).await.expect("a round");
        assert_eq!(count("SELECT count(*) FROM bench_dispatch_floor WHERE state = 'queued'").await, 700);
        assert_eq!(count("SELECT count(*) FROM bench_dispatch_floor").await, 700);
        assert_eq!(count("SELECT count(*) FROM bench_dispatch_floor_history").await, 700);
    }
    floor.drop_tables(store).await.expect("drop");
    let left = "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'bench_dispatch_floor%'";
    assert_eq!(count(left).await, 0, "the scratch tables are dropped");
    sql.close().await.expect("close");
    database.tear_down().await;
}

/// `fleetpatch bench` reads PostgreSQL's time by statement from
/// `pg_stat_statements` when the server loads it, and reads nothing (no
/// error) when it does not.
#[tokio::test]
async fn statement_totals_come_from_pg_stat_statements_when_the_server_loads_it() {
    use fleetpatch_store::ceiling::{statement_totals, statements_between};
    use fleetpatch_store::private_postgres::PrivatePostgres;
    let plain = PrivatePostgres::start();
    let store = Store::connect(&StoreOptions { url: plain.url(), max_connections: 2 }).await.expect("connect");
    assert!(statement_totals(&store).await.expect("read").is_none(), "a server without the library has none");
    store.close().await;

    let loaded = PrivatePostgres::start_with(&[("shared_preload_libraries", "pg_stat_statements")]);
    let store = Store::connect(&StoreOptions { url: loaded.url(), max_connections: 2 }).await.expect("connect");
    let before = statement_totals(&store).await.expect("read").expect("loaded: totals");
    store.migrate().await.expect("migrate");
    let after = statement_totals(&store).await.expect("read").expect("loaded: totals");
    let spent = statements_between(&before, &after);
    assert!(
        spent.iter().any(|s| s.query.contains("CREATE TABLE") && s.calls >= 1),
        "the migration's statements are counted: {spent:?}"
    );
    assert!(spent.windows(2).all(|w| w[0].milliseconds >= w[1].milliseconds), "most time first");
    store.close().await;
}
