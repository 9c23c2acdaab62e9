//! The outbox relay: publishes what transactions committed to the outbox,
//! then deletes it. A relay that dies between publish and delete leaves the
//! rows for the next pass, so a message may be published twice (consumers
//! are idempotent) but never lost.
//!
//! **No broker call inside an open database transaction**: a pass claims
//! rows with a lease ([`OUTBOX_LEASE`], one autocommitted statement), then
//! publishes with no transaction open, then deletes what the broker
//! confirmed (or gives the claim back if publishing failed). A broker that
//! blocks therefore holds no row lock and no pool connection; a relay that
//! dies with a claim leaves rows that any relay takes again once the lease
//! has run out.

use std::time::Duration;

use fleetpatch_bus::{Bus, Destination, Outgoing};
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement};

use crate::ops::StoredHeaders;
use crate::{Result, Store};

/// How long a relay's claim on outbox rows lasts: longer than connecting
/// to the broker plus waiting for its confirms, so a live relay never has
/// its rows taken by another one.
pub const OUTBOX_LEASE: Duration = Duration::from_secs(90);

/// A relay's claim on PostgreSQL: rows another relay is claiming right now
/// are skipped, not waited for. `$1`: the lease's end, `$2`: now (ms since
/// the epoch), `$3`: the most rows.
///
/// The claimed ids are one array (`= ANY(ARRAY(…))`), so the update finds
/// its rows by the primary key. With `IN (subquery)` PostgreSQL expected as
/// many rows as the limit and joined them by hash with a sequential scan of
/// the whole table, dead rows included: the outbox is a queue, every
/// published row is deleted, and until autovacuum came by each claim read
/// all of it (`fleetpatch bench`, collector phase: 410 pages and 0.43 ms
/// per claim, 1,038 claims; `pg_stat_statements`). Checked by
/// `conformance::the_relays_claim_reads_the_outbox_by_its_key`.
pub(crate) const CLAIM_POSTGRES: &str = "UPDATE outbox SET claimed_until_ms = $1 WHERE id = ANY(ARRAY(SELECT id \
     FROM outbox WHERE claimed_until_ms IS NULL OR claimed_until_ms < $2 ORDER BY id LIMIT $3 FOR UPDATE SKIP \
     LOCKED)) RETURNING id, exchange, routing_key, payload, headers";

/// The same claim elsewhere (SQLite: one writer at a time, no row locks).
const CLAIM_PORTABLE: &str = "UPDATE outbox SET claimed_until_ms = ? WHERE id IN (SELECT id FROM outbox \
     WHERE claimed_until_ms IS NULL OR claimed_until_ms < ? ORDER BY id LIMIT ?) \
     RETURNING id, exchange, routing_key, payload, headers";

fn ids_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

impl Store {
    /// Publishes up to `limit` outbox messages; returns how many.
    pub async fn relay_outbox(&self, bus: &Bus, limit: u64) -> Result<usize> {
        let now_ms = fleetpatch_bus::now_unix_ms();
        let until_ms = now_ms + OUTBOX_LEASE.as_millis() as i64;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // One statement (autocommitted): the rows are claimed, not locked.
        // Its text never changes (the times and the limit are parameters),
        // so each connection parses and plans it once, not at every pass.
        let claim = match self.backend() {
            DbBackend::Postgres => CLAIM_POSTGRES,
            _ => CLAIM_PORTABLE,
        };
        let values = vec![until_ms.into(), now_ms.into(), limit.into()];
        let rows = self.db.query_all(Statement::from_sql_and_values(self.backend(), claim, values)).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let (ids, messages): (Vec<i64>, Vec<Outgoing>) = decode_rows(rows)?.into_iter().unzip();
        let count = messages.len();
        match bus.publish(messages).await {
            Ok(()) => {
                let delete = match self.backend() {
                    DbBackend::Postgres => Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        "DELETE FROM outbox WHERE id = ANY($1)",
                        [crate::ops::pg_array(sea_orm::sea_query::ArrayType::BigInt, ids.iter().copied())],
                    ),
                    backend => {
                        Statement::from_string(backend, format!("DELETE FROM outbox WHERE id IN ({})", ids_list(&ids)))
                    }
                };
                self.db.execute(delete).await?;
                Ok(count)
            }
            Err(error) => {
                // Give the claim back so the next pass (ours or another
                // relay's) does not wait for the lease to run out.
                let sql = format!("UPDATE outbox SET claimed_until_ms = NULL WHERE id IN ({})", ids_list(&ids));
                if let Err(release) = self.db.execute(Statement::from_string(self.backend(), sql)).await {
                    tracing::warn!(error = %release, "could not release the outbox claim; it expires by itself");
                }
                tracing::warn!(error = %error, "outbox relay could not publish; will retry");
                Err(crate::Error::Conflict(format!("publishing the outbox failed: {error}")))
            }
        }
    }
}

/// Outbox rows in commit order, with their ids, as the messages they will be published as.
fn decode_rows(rows: Vec<QueryResult>) -> Result<Vec<(i64, Outgoing)>> {
    let mut ordered: Vec<(i64, Outgoing)> = Vec::with_capacity(rows.len());
    for row in rows {
        let id: i64 = row.try_get("", "id")?;
        let exchange: String = row.try_get("", "exchange")?;
        let routing_key: String = row.try_get("", "routing_key")?;
        let payload: Vec<u8> = row.try_get("", "payload")?;
        let headers: serde_json::Value = row.try_get("", "headers")?;
        let stored: StoredHeaders = serde_json::from_value(headers)
            .map_err(|error| crate::Error::Corrupt(format!("outbox headers: {error}")))?;
        ordered.push((
            id,
            Outgoing {
                destination: if exchange == "events" { Destination::Events } else { Destination::Work },
                routing_key,
                payload,
                headers: stored.headers,
                due_at_unix_ms: stored.due_at_unix_ms,
            },
        ));
    }
    ordered.sort_by_key(|(id, _)| *id);
    Ok(ordered)
}

impl Store {
    /// The oldest `limit` messages waiting in the outbox, without taking
    /// them (for diagnostics: what has been committed and not yet published).
    pub async fn outbox_peek(&self, limit: u64) -> Result<Vec<Outgoing>> {
        let sql = format!("SELECT id, exchange, routing_key, payload, headers FROM outbox ORDER BY id LIMIT {limit}");
        let rows = decode_rows(self.db.query_all(Statement::from_string(self.backend(), sql)).await?)?;
        Ok(rows.into_iter().map(|(_, message)| message).collect())
    }

    /// How many messages wait in the outbox.
    pub async fn outbox_depth(&self) -> Result<u64> {
        let row = self
            .db
            .query_one(Statement::from_string(self.backend(), "SELECT COUNT(*) AS n FROM outbox".to_owned()))
            .await?;
        Ok(row.map(|row| row.try_get::<i64>("", "n")).transpose()?.unwrap_or(0) as u64)
    }
}

/// The most rows one relay pass claims and publishes.
const RELAY_PASS_ROWS: u64 = 500;

/// Runs the relay until `shutdown`: drains the outbox whenever `nudge` is
/// notified (after a commit) and at least every `interval` (the reconciler
/// pass that catches what a dead process committed and never sent). With a
/// `gather` window, a nudge waits that long before the pass, so that the
/// commits of the next few moments go out in the same pass (its claim,
/// publish and delete carry more rows each).
pub async fn run_relay(
    store: Store,
    bus: Bus,
    nudge: std::sync::Arc<tokio::sync::Notify>,
    interval: std::time::Duration,
    gather: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        loop {
            match store.relay_outbox(&bus, RELAY_PASS_ROWS).await {
                Ok(0) => break,
                Ok(count) => {
                    metrics::counter!("fleetpatch_outbox_published_total").increment(count as u64);
                    if (count as u64) < RELAY_PASS_ROWS {
                        // The claim found fewer rows than it could take: the
                        // outbox was drained then. Rows committed since come
                        // with a nudge of their own (kept by `notify_one`
                        // while nobody waits), so no empty claim is run to
                        // find that out (a third of a pass's statements).
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "outbox relay pass failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = nudge.notified() => {
                if !gather.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(gather) => {}
                        // The next turn of the loop drains and sees the shutdown.
                        _ = shutdown.cancelled() => {}
                    }
                }
            }
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => {
                // One last pass so nothing committed waits for the next start.
                let _ = store.relay_outbox(&bus, 10_000).await;
                return;
            }
        }
    }
}
