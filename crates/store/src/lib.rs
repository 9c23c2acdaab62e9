//! fleetpatch's persistent state, and the only code that writes it.
//!
//! PostgreSQL in production, SQLite for the embedded default, both through
//! sea-orm with the same migrations. Every target state change is one
//! guarded UPDATE (`WHERE state IN (expected) AND attempt = expected`) in a
//! transaction that also appends the transition to `target_transitions` and
//! the messages that announce it to the `outbox`; [`relay`] publishes the
//! outbox. A duplicated or redelivered message therefore changes nothing:
//! its guarded UPDATE matches no row.
//!
//! **Architecture invariant**: no other crate issues SQL; services call the
//! operations here.

use chrono::{DateTime, Utc};
use fleetpatch_proto::state::TargetState;
use fleetpatch_runtime::Clock;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend, DbErr,
    TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

pub mod auth;
/// The database's raw INSERT rates, for `fleetpatch bench` only (feature `ceiling`).
#[cfg(feature = "ceiling")]
pub mod ceiling;
#[cfg(feature = "test-support")]
pub mod conformance;
pub mod content;
pub mod entity;
pub mod model;
mod ops;
#[cfg(feature = "test-support")]
pub mod private_postgres;
pub mod reconcile;
pub mod relay;
pub mod schedule;

pub use auth::{ActorKind, ApiKey, AuditEntry, AuditQuery, IssuedApiKey, KeyCheck, NewAuditEntry, ParsedApiKey, Role};
pub use model::*;
pub use ops::console::{FailureReason, TargetFilter, TimelineEntry};
pub use ops::{
    dispatch_request, watch_message, CheckOutcome, Claim, DispatchOutcome, FleetGauges, ProbeOutcome, Reachability,
    RebootCheck, RebootOutcome, ReportIntake, RolloutIntake, TimeoutPolicy, TokenInfo, WatchOutcome,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the database at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(
        "the database at {url} is not migrated ({reason}); run `fleetpatch migrate` (with the same configuration) first"
    )]
    NotMigrated { url: String, reason: String },
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    /// The caller's input cannot be stored as given (the message names the field).
    #[error("{0}")]
    Invalid(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A move the target state machine does not have; nothing was written.
    #[error("target {target_id} cannot move from {from} to {to}: not an edge of the state machine")]
    IllegalTransition { target_id: uuid::Uuid, from: TargetState, to: TargetState },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Database settings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreOptions {
    /// `postgres://user@host:5432/db` or `sqlite://path?mode=rwc`.
    pub url: String,
    pub max_connections: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { url: "postgres://postgres@127.0.0.1:5432/fleetpatch".into(), max_connections: 16 }
    }
}

impl StoreOptions {
    /// Refuses settings no pool can be built with, naming the key (a pool
    /// of no connections made sqlx panic: "capacity must be non-zero").
    pub fn validate(&self) -> std::result::Result<(), fleetpatch_runtime::ConfigError> {
        if self.url.is_empty() {
            return Err(fleetpatch_runtime::ConfigError::invalid("database.url", "must be set"));
        }
        if self.max_connections == 0 {
            return Err(fleetpatch_runtime::ConfigError::too_small("database.max_connections", 1));
        }
        Ok(())
    }
}

/// The URL with its password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    fleetpatch_bus::rabbitmq::redact_url(url)
}

/// How long taking a connection from the pool may wait (for a free one or a new one).
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A pooled connection idle longer than this is tested (a round trip)
/// before it is lent again. sqlx tests every connection as it comes back to
/// the pool; testing it again as it leaves, its default, cost a round trip
/// per batch and per key look-up on the collector's hot path (issue 20:
/// about 4 % of the collector's CPU, and as many wake-ups of its PostgreSQL
/// backend). A connection back for less than this was tested that recently;
/// if the server went away meanwhile, the one statement that finds out fails
/// and the connection is closed, as any statement in flight during an
/// outage fails.
const IDLE_BEFORE_TEST: std::time::Duration = std::time::Duration::from_secs(1);

/// PostgreSQL's pool: sea-orm's own, but with [`IDLE_BEFORE_TEST`].
async fn postgres_pool(options: &StoreOptions) -> std::result::Result<DatabaseConnection, sea_orm::sqlx::Error> {
    use sea_orm::sqlx::{postgres::PgPoolOptions, ConnectOptions as _, Connection as _};
    let connect = options.url.parse::<sea_orm::sqlx::postgres::PgConnectOptions>()?.disable_statement_logging();
    let pool = PgPoolOptions::new()
        .max_connections(options.max_connections)
        .min_connections(1)
        .acquire_timeout(CONNECT_TIMEOUT)
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_BEFORE_TEST {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(connect)
        .await?;
    Ok(sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool))
}

/// A handle on the database. Cheap to clone.
///
/// Every instant the store writes or compares (deadlines, `last_seen_at`,
/// the watchdog's timeouts, history and outbox timestamps) comes from its
/// [`Clock`]: the system clock unless [`Store::with_clock`] gave another.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    url: String,
    clock: Clock,
}

impl Store {
    /// Connects without touching the schema.
    pub async fn connect(options: &StoreOptions) -> Result<Self> {
        let refused = |reason: String| Error::Connect { url: redact_url(&options.url), reason: redact_url(&reason) };
        options.validate().map_err(|error| refused(error.to_string()))?;
        let db = if options.url.starts_with("postgres") {
            postgres_pool(options).await.map_err(|error| refused(error.to_string()))?
        } else {
            let mut connect = ConnectOptions::new(options.url.clone());
            connect
                .max_connections(options.max_connections)
                .min_connections(1)
                .connect_timeout(CONNECT_TIMEOUT)
                .sqlx_logging(false);
            Database::connect(connect).await.map_err(|error| refused(error.to_string()))?
        };
        if db.get_database_backend() == DbBackend::Sqlite {
            // One writer at a time; wait for it rather than failing with SQLITE_BUSY.
            db.execute_unprepared("PRAGMA journal_mode=WAL; PRAGMA busy_timeout=10000; PRAGMA foreign_keys=ON;")
                .await?;
        }
        Ok(Self { db, url: redact_url(&options.url), clock: Clock::system() })
    }

    /// The same store reading time from `clock` (a test's manual clock).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The clock this store decides by; services that compare against the
    /// store's instants (the scheduler's watchdog) read this one.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub(crate) fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Begins a write transaction. On SQLite it takes the database's write
    /// lock at once, as `BEGIN IMMEDIATE` does: a transaction that read
    /// first and wrote later would fail with `SQLITE_BUSY` (its snapshot is
    /// stale) when another connection wrote meanwhile, where waiting for the
    /// lock (`busy_timeout`) serializes the writers. PostgreSQL serializes
    /// them with row locks instead.
    pub(crate) async fn begin(&self) -> Result<DatabaseTransaction> {
        let txn = self.db.begin().await?;
        if self.backend() == DbBackend::Sqlite {
            // Any write statement takes the lock, even one that matches no row.
            txn.execute_unprepared("DELETE FROM outbox WHERE 0").await?;
        }
        Ok(txn)
    }

    /// Connects and refuses a database that is not fully migrated.
    pub async fn connect_migrated(options: &StoreOptions) -> Result<Self> {
        let store = Self::connect(options).await?;
        store.check_migrated().await?;
        Ok(store)
    }

    /// Like [`Store::connect_migrated`], but waits for an unreachable
    /// database with growing pauses (200 ms up to 5 s, logging what it waits
    /// for) until it answers or `give_up` completes: a service started
    /// before its database waits instead of exiting. A database that answers
    /// but is not migrated is refused at once (waiting would not fix it).
    pub async fn connect_waiting(
        options: &StoreOptions,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Result<Self> {
        let mut pause = std::time::Duration::from_millis(200);
        tokio::pin!(give_up);
        loop {
            match Self::connect_migrated(options).await {
                Err(error @ Error::Connect { .. }) => {
                    tracing::warn!(error = %error, retry_in_ms = pause.as_millis() as u64, "waiting for the database");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = &mut give_up => return Err(error),
                    }
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<()> {
        fleetpatch_migrations::Migrator::up(&self.db, None).await?;
        Ok(())
    }

    /// Fails with [`Error::NotMigrated`] unless every migration is applied.
    pub async fn check_migrated(&self) -> Result<()> {
        let pending = fleetpatch_migrations::Migrator::get_pending_migrations(&self.db).await.map_err(|error| {
            Error::NotMigrated { url: self.url.clone(), reason: format!("cannot read its migrations: {error}") }
        })?;
        if !pending.is_empty() {
            let names: Vec<String> = pending.iter().map(|m| m.name().to_owned()).collect();
            return Err(Error::NotMigrated {
                url: self.url.clone(),
                reason: format!("{} pending: {}", names.len(), names.join(", ")),
            });
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        self.db.ping().await?;
        Ok(())
    }

    /// A readiness check for a service's `/readyz`: the database answers a ping.
    pub fn readiness_check(
        &self,
    ) -> impl Fn() -> futures_util::future::BoxFuture<'static, bool> + Send + Sync + 'static {
        let store = self.clone();
        move || {
            let store = store.clone();
            Box::pin(async move { store.ping().await.is_ok() })
        }
    }

    pub fn backend(&self) -> DbBackend {
        self.db.get_database_backend()
    }

    /// The raw connection, for the store's own benchmark and tests only:
    /// every SQL statement of fleetpatch is issued by this crate.
    #[cfg(any(feature = "ceiling", feature = "test-support"))]
    pub(crate) fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    pub async fn close(self) {
        let _ = self.db.close().await;
    }
}

/// The URL of database `name` on the same PostgreSQL server as `url`.
pub fn sibling_url(url: &str, name: &str) -> Result<String> {
    let start = url.find("://").map(|i| i + 3).unwrap_or(0);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    match base[start..].find('/') {
        Some(slash) => Ok(format!("{}/{name}{query}", &base[..start + slash])),
        None => Ok(format!("{base}/{name}{query}")),
    }
}

fn check_database_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(Error::Conflict(format!("{name:?} is not a database name (lowercase letters, digits, _)")))
    }
}

/// A connection to the server of `options`: its own database, or the
/// `postgres` maintenance database when that one does not exist yet.
async fn admin_connect(options: &StoreOptions) -> Result<Store> {
    let own = StoreOptions { max_connections: 1, ..options.clone() };
    match Store::connect(&own).await {
        Ok(store) => Ok(store),
        Err(error) if options.url.starts_with("postgres") => {
            let maintenance = StoreOptions { url: sibling_url(&options.url, "postgres")?, ..own };
            Store::connect(&maintenance).await.map_err(|_| error)
        }
        Err(error) => Err(error),
    }
}

/// Creates database `name` on the PostgreSQL server of `options` (whose
/// user needs CREATEDB) and returns options that point at it.
pub async fn create_sibling_database(options: &StoreOptions, name: &str) -> Result<StoreOptions> {
    check_database_name(name)?;
    let admin = admin_connect(options).await?;
    if admin.backend() != DbBackend::Postgres {
        return Err(Error::Conflict("a separate database can be created on PostgreSQL only".into()));
    }
    admin.db.execute_unprepared(&format!("CREATE DATABASE {name}")).await?;
    admin.close().await;
    Ok(StoreOptions { url: sibling_url(&options.url, name)?, ..options.clone() })
}

/// Drops database `name` on the PostgreSQL server of `options`, closing its connections.
pub async fn drop_sibling_database(options: &StoreOptions, name: &str) -> Result<()> {
    check_database_name(name)?;
    let admin = admin_connect(options).await?;
    admin.db.execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
    admin.close().await;
    Ok(())
}

/// Whether database `name` exists on the PostgreSQL server of `options`.
pub async fn sibling_database_exists(options: &StoreOptions, name: &str) -> Result<bool> {
    check_database_name(name)?;
    let admin = admin_connect(options).await?;
    let statement = sea_orm::Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT 1 AS found FROM pg_database WHERE datname = $1",
        [name.into()],
    );
    let found = admin.db.query_one(statement).await?.is_some();
    admin.close().await;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_urls_replace_only_the_database() {
        let url = |u: &str| sibling_url(u, "other").unwrap();
        assert_eq!(url("postgres://u:p@h:5432/fleet"), "postgres://u:p@h:5432/other");
        assert_eq!(url("postgres://u@h/fleet?sslmode=require"), "postgres://u@h/other?sslmode=require");
        assert_eq!(url("postgres://h:5432"), "postgres://h:5432/other");
    }

    #[test]
    fn database_names_are_checked() {
        for bad in ["", "Bench", "a-b", "1abc", "x; DROP DATABASE y"] {
            assert!(check_database_name(bad).is_err(), "{bad:?}");
        }
        check_database_name("fleetpatch_bench_0a1b").unwrap();
    }

    #[tokio::test]
    async fn a_pool_of_no_connections_is_refused_by_name() {
        let options = StoreOptions { url: "sqlite::memory:".into(), max_connections: 0 };
        let refused = options.validate().unwrap_err();
        assert_eq!(refused.to_string(), "database.max_connections must be at least 1");
        // Connecting anyway is an error naming the key, not sqlx's panic.
        let Err(error) = Store::connect(&options).await else { panic!("a pool of no connections was built") };
        assert!(matches!(error, Error::Connect { .. }), "{error:?}");
        assert!(error.to_string().contains("database.max_connections must be at least 1"), "{error}");
        let unset = StoreOptions { url: String::new(), max_connections: 1 };
        assert_eq!(unset.validate().unwrap_err().to_string(), "database.url must be set");
        StoreOptions { max_connections: 1, ..options }.validate().unwrap();
    }
}
