//! The database's own ceiling, for `fleetpatch bench`: rows per second of
//! batched multi-row INSERTs, and transactions per second of one-row
//! INSERTs, into a scratch table shaped like `agent_events` (same columns,
//! same unique index), through the same driver. The collector's rate is
//! reported against both.

use std::time::Instant;

use sea_orm::sea_query::{Alias, Query};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use uuid::Uuid;

use crate::{Error, Result, Store};

const TABLE: &str = "bench_ceiling_events";

/// What the database sustained.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DatabaseCeiling {
    pub clients: usize,
    pub batch_rows: usize,
    /// Rows per second in `batch_rows`-row INSERT statements.
    pub batched_rows_per_second: f64,
    /// One-row INSERT transactions per second.
    pub single_row_transactions_per_second: f64,
}

async fn execute(store: &Store, sql: &str) -> Result<()> {
    store.connection().execute(Statement::from_string(store.backend(), sql.to_owned())).await?;
    Ok(())
}

fn insert(rows: usize, target: Uuid, first_seq: i64) -> sea_orm::sea_query::InsertStatement {
    let mut insert = Query::insert();
    insert.into_table(Alias::new(TABLE)).columns(
        ["target_id", "attempt", "seq", "kind", "patch_index", "exit_code", "detail", "sent_at", "received_at"]
            .map(Alias::new),
    );
    let at = chrono::Utc::now();
    for i in 0..rows {
        insert.values_panic([
            target.into(),
            1i32.into(),
            (first_seq + i as i64).into(),
            "finished".into(),
            Some(0i32).into(),
            Some(0i32).into(),
            Some("installed".to_owned()).into(),
            Some(at).into(),
            at.into(),
        ]);
    }
    insert
}

/// Inserts `batched_rows` rows in `batch_rows`-row statements and
/// `single_rows` rows one transaction each, both from `clients` concurrent
/// connections. PostgreSQL only; the scratch table is dropped afterwards.
pub async fn database_ceiling(
    store: &Store,
    clients: usize,
    batch_rows: usize,
    batched_rows: usize,
    single_rows: usize,
) -> Result<DatabaseCeiling> {
    if store.backend() != DbBackend::Postgres {
        return Err(Error::Conflict("the database ceiling is measured on PostgreSQL only".into()));
    }
    let clients = clients.max(1);
    let batch_rows = batch_rows.max(1);
    execute(store, &format!("DROP TABLE IF EXISTS {TABLE}")).await?;
    execute(
        store,
        &format!(
            "CREATE TABLE {TABLE} (id BIGSERIAL PRIMARY KEY, target_id UUID NOT NULL, attempt INTEGER NOT NULL, \
             seq BIGINT NOT NULL, kind VARCHAR NOT NULL, patch_index INTEGER, exit_code INTEGER, detail TEXT, \
             sent_at TIMESTAMPTZ, received_at TIMESTAMPTZ NOT NULL)"
        ),
    )
    .await?;
    execute(store, &format!("CREATE UNIQUE INDEX {TABLE}_idempotency ON {TABLE} (target_id, attempt, seq)")).await?;

    let run = |rows_per_statement: usize, total: usize| {
        let store = store.clone();
        async move {
            let statements_per_client = total.div_ceil(rows_per_statement).div_ceil(clients);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..clients {
                let store = store.clone();
                tasks.push(tokio::spawn(async move {
                    let target = Uuid::new_v4();
                    for n in 0..statements_per_client {
                        let statement =
                            store.backend().build(&insert(rows_per_statement, target, (n * rows_per_statement) as i64));
                        store.connection().execute(statement).await?;
                    }
                    Ok::<usize, Error>(statements_per_client * rows_per_statement)
                }));
            }
            let mut rows = 0;
            for task in tasks {
                rows += task.await.map_err(|error| Error::Conflict(format!("a ceiling client failed: {error}")))??;
            }
            Ok::<f64, Error>(rows as f64 / started.elapsed().as_secs_f64().max(1e-9))
        }
    };
    let measured = async {
        let batched = run(batch_rows, batched_rows).await?;
        let single = run(1, single_rows).await?;
        Ok::<_, Error>((batched, single))
    }
    .await;
    execute(store, &format!("DROP TABLE IF EXISTS {TABLE}")).await?;
    let (batched, single) = measured?;
    Ok(DatabaseCeiling {
        clients,
        batch_rows,
        batched_rows_per_second: batched,
        single_row_transactions_per_second: single,
    })
}

const FLOOR_TARGETS: &str = "bench_dispatch_floor";
const FLOOR_HISTORY: &str = "bench_dispatch_floor_history";

/// The database work of one dispatch of `rows` targets done on scratch
/// tables that start empty every time, for the dispatch bench: the rows
/// written as `pending`, moved to `queued` by primary key, one history row
/// each, committed. Its cost does not depend on how far a rollout has gone,
/// so timing it beside each dispatch tells the machine's speed at that
/// moment (this machine's varies 2–5× from hour to hour) from the
/// dispatch's own: a dispatch that slows down as its rollout progresses
/// shows as a growing ratio to this floor. PostgreSQL only.
pub struct DispatchFloor {
    rows: usize,
}

impl DispatchFloor {
    /// Creates the scratch tables (`id` the primary key, an index on
    /// `state`, as `targets` has; the history keyed by target).
    pub async fn create(store: &Store, rows: usize) -> Result<Self> {
        if store.backend() != DbBackend::Postgres {
            return Err(Error::Conflict("the dispatch floor is measured on PostgreSQL only".into()));
        }
        for sql in [
            format!("DROP TABLE IF EXISTS {FLOOR_TARGETS}, {FLOOR_HISTORY}"),
            format!(
                "CREATE TABLE {FLOOR_TARGETS} (id UUID PRIMARY KEY, ordinal INTEGER NOT NULL, state VARCHAR NOT NULL, \
                 queued_at TIMESTAMPTZ)"
            ),
            format!("CREATE INDEX {FLOOR_TARGETS}_state ON {FLOOR_TARGETS} (state)"),
            format!(
                "CREATE TABLE {FLOOR_HISTORY} (id BIGSERIAL PRIMARY KEY, target_id UUID NOT NULL, from_state VARCHAR \
                 NOT NULL, to_state VARCHAR NOT NULL, at TIMESTAMPTZ NOT NULL)"
            ),
            format!("CREATE INDEX {FLOOR_HISTORY}_target ON {FLOOR_HISTORY} (target_id)"),
        ] {
            execute(store, &sql).await?;
        }
        Ok(Self { rows: rows.max(1) })
    }

    /// One round, timed: the tables emptied (outside the timing), then in
    /// one transaction `rows` pending rows written, moved to `queued` and
    /// their history written.
    pub async fn run(&self, store: &Store) -> Result<std::time::Duration> {
        execute(store, &format!("TRUNCATE {FLOOR_TARGETS}, {FLOOR_HISTORY}")).await?;
        let started = Instant::now();
        let txn = store.begin().await?;
        for sql in [
            format!(
                "INSERT INTO {FLOOR_TARGETS} (id, ordinal, state) SELECT gen_random_uuid(), g, 'pending' FROM \
                 generate_series(1, {}) AS g",
                self.rows
            ),
            format!(
                "WITH moved AS (UPDATE {FLOOR_TARGETS} SET state = 'queued', queued_at = now() WHERE id IN (SELECT \
                 id FROM {FLOOR_TARGETS} WHERE state = 'pending' ORDER BY ordinal FOR NO KEY UPDATE) RETURNING id) \
                 INSERT INTO {FLOOR_HISTORY} (target_id, from_state, to_state, at) SELECT id, 'pending', 'queued', \
                 now() FROM moved"
            ),
        ] {
            let written = txn.execute(Statement::from_string(DbBackend::Postgres, sql)).await?.rows_affected();
            // Each statement writes every row of the round, or the round is
            // not the fixed unit of work it stands for.
            if written != self.rows as u64 {
                return Err(Error::Conflict(format!(
                    "a dispatch floor round wrote {written} rows in one statement, not {}: the scratch tables were \
                     not empty",
                    self.rows
                )));
            }
        }
        txn.commit().await?;
        Ok(started.elapsed())
    }

    /// Drops the scratch tables.
    pub async fn drop_tables(self, store: &Store) -> Result<()> {
        execute(store, &format!("DROP TABLE IF EXISTS {FLOOR_TARGETS}, {FLOOR_HISTORY}")).await
    }
}

/// One statement's totals in `pg_stat_statements` (its text normalized by
/// PostgreSQL: constants are `$n`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StatementTotals {
    pub query: String,
    pub calls: i64,
    /// Planning and execution, milliseconds (wall time inside the server:
    /// on a busy machine mostly CPU, with lock and I/O waits).
    pub milliseconds: f64,
}

/// The totals of every statement run in this store's database so far, by
/// PostgreSQL's query id, when `pg_stat_statements` is loaded on the server
/// and created in the database; `None` when it is not (it is optional, for
/// attributing the database's time to statements; a plain server has it
/// off).
pub async fn statement_totals(store: &Store) -> Result<Option<std::collections::HashMap<i64, StatementTotals>>> {
    if store.backend() != DbBackend::Postgres {
        return Ok(None);
    }
    let db = store.connection();
    let loaded = "SELECT 1 FROM pg_settings WHERE name = 'shared_preload_libraries' \
                  AND 'pg_stat_statements' = ANY(string_to_array(replace(setting, ' ', ''), ','))";
    if db.query_one(Statement::from_string(DbBackend::Postgres, loaded)).await?.is_none() {
        return Ok(None);
    }
    db.execute(Statement::from_string(DbBackend::Postgres, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        .await?;
    // Planning time is a column only with `pg_stat_statements.track_planning`
    // on; it is 0 otherwise.
    let sql = "SELECT queryid, query, calls, total_plan_time + total_exec_time AS ms FROM pg_stat_statements \
               WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) AND queryid IS NOT NULL";
    let mut totals = std::collections::HashMap::new();
    for row in db.query_all(Statement::from_string(DbBackend::Postgres, sql)).await? {
        let id: i64 = row.try_get("", "queryid")?;
        let query: String = row.try_get("", "query")?;
        let calls: i64 = row.try_get("", "calls")?;
        let milliseconds: f64 = row.try_get("", "ms")?;
        totals.insert(id, StatementTotals { query, calls, milliseconds });
    }
    Ok(Some(totals))
}

/// What each statement took between two [`statement_totals`], most first:
/// (its text, calls, milliseconds).
pub fn statements_between(
    before: &std::collections::HashMap<i64, StatementTotals>,
    after: &std::collections::HashMap<i64, StatementTotals>,
) -> Vec<StatementTotals> {
    let mut spent: Vec<StatementTotals> = after
        .iter()
        .filter_map(|(id, later)| {
            let (calls, milliseconds) = match before.get(id) {
                Some(earlier) => (later.calls - earlier.calls, later.milliseconds - earlier.milliseconds),
                None => (later.calls, later.milliseconds),
            };
            (calls > 0).then(|| StatementTotals { query: later.query.clone(), calls, milliseconds })
        })
        .collect();
    spent.sort_by(|a, b| b.milliseconds.total_cmp(&a.milliseconds));
    spent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_told_by_what_they_took_between_two_readings() {
        let totals = |rows: &[(i64, &str, i64, f64)]| {
            rows.iter()
                .map(|(id, query, calls, ms)| {
                    (*id, StatementTotals { query: query.to_string(), calls: *calls, milliseconds: *ms })
                })
                .collect()
        };
        let before = totals(&[(1, "SELECT a", 10, 5.0), (2, "INSERT b", 3, 9.0)]);
        let after = totals(&[(1, "SELECT a", 30, 6.0), (2, "INSERT b", 3, 9.0), (3, "UPDATE c", 4, 2.5)]);
        let spent = statements_between(&before, &after);
        assert_eq!(
            spent.iter().map(|s| (s.query.as_str(), s.calls, s.milliseconds)).collect::<Vec<_>>(),
            vec![("UPDATE c", 4, 2.5), ("SELECT a", 20, 1.0)],
            "a statement first seen counts whole; one not run again is left out; most time first"
        );
    }
}
