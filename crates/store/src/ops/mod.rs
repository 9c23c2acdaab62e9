//! The operations on the store: rollouts, dispatch, target transitions,
//! the watchdog check and the collector's batched report intake.
//!
//! Row locks that serialize writers are `FOR NO KEY UPDATE`, never
//! `FOR UPDATE`: the foreign-key checks of concurrent inserts and updates
//! (an agent event naming its target, a target row its transaction already
//! updated naming its rollout) take `FOR KEY SHARE` on the parent row, which
//! `FOR UPDATE` blocks and `FOR NO KEY UPDATE` does not. With `FOR UPDATE`
//! on the rollout, every final result waited for the whole dispatch pass.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetpatch_bus::Outgoing;
use fleetpatch_proto::routing;
use fleetpatch_proto::state::{PatchState, RolloutState, TargetState};
use fleetpatch_proto::v1;
use fleetpatch_proto::Message;
use sea_orm::sea_query::{Expr, Func, LockType, OnConflict, Query, SimpleExpr};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
};
use uuid::Uuid;

use crate::entity::{agent_events, outbox, patches, rollouts, target_patches, target_transitions, targets};
use crate::model::*;
use crate::{Error, Result, Store};
use transition::{apply_move, Move};

pub use offline::{CheckOutcome, Reachability};
pub use reboot::{RebootCheck, RebootOutcome};

const INSERT_CHUNK: usize = 1_000;

// ---------------------------------------------------------------- conversions

fn transition_from(m: target_transitions::Model) -> Transition {
    Transition { target_id: m.target_id, from: m.from_state, to: m.to_state, at: m.at, detail: m.detail }
}

fn parse<T: std::str::FromStr>(value: &str, what: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    value.parse().map_err(|error| Error::Corrupt(format!("{what}: {error}")))
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value, what: &str) -> Result<T> {
    serde_json::from_value(value).map_err(|error| Error::Corrupt(format!("{what}: {error}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("plain data serializes")
}

fn rollout_from(m: rollouts::Model) -> Result<Rollout> {
    Ok(Rollout {
        id: m.id,
        name: m.name,
        state: parse(&m.state, "rollout state")?,
        pause_reason: m.pause_reason,
        current_wave: m.current_wave as u32,
        concurrency: m.concurrency as u32,
        timeout_seconds: m.timeout_seconds as u32,
        waves: from_json(m.waves, "rollout waves")?,
        settings: from_json(m.settings, "rollout settings")?,
        next_window_at: m.next_window_at,
        created_at: m.created_at,
        updated_at: m.updated_at,
        completed_at: m.completed_at,
    })
}

fn patch_from(m: patches::Model) -> Result<Patch> {
    Ok(Patch {
        index: m.patch_index as u32,
        name: m.name,
        kb: m.kb,
        file: m.file,
        sha256: m.sha256,
        size: m.size as u64,
        installer: from_json(serde_json::Value::String(m.installer), "installer kind")?,
        arguments: m.arguments,
        success_codes: from_json(m.success_codes, "success codes")?,
        reboot_codes: from_json(m.reboot_codes, "reboot codes")?,
        timeout_seconds: m.timeout_seconds as u32,
        detection: m.detection.map(|d| from_json(d, "detection rule")).transpose()?,
    })
}

fn target_from(m: targets::Model) -> Result<Target> {
    Ok(Target {
        id: m.id,
        rollout_id: m.rollout_id,
        ordinal: m.ordinal as u32,
        host: m.host,
        port: m.port.map(|p| p as u16),
        transport: m.transport,
        labels: from_json(m.labels, "target labels")?,
        credential: m.credential,
        wave: m.wave as u32,
        state: parse(&m.state, "target state")?,
        attempt: m.attempt as u32,
        tries: m.r#try as u32,
        timeout_seconds: m.timeout_seconds as u32,
        last_seen_at: m.last_seen_at,
        error: m.error,
        os: m.os,
        arch: m.arch,
        queued_at: m.queued_at,
        running_at: m.running_at,
        finished_at: m.finished_at,
        verified_state: m.verified_state,
        verified_at: m.verified_at,
        offline_until: m.offline_until,
        next_check_at: m.next_check_at,
        reboot_until: m.reboot_until,
        went_down_at: m.went_down_at,
        delivery: m.delivery,
        boot_id: m.probe.as_ref().and_then(|probe| probe.get("boot_id")).and_then(|id| id.as_str()).map(str::to_owned),
        token_hash: m.token_hash,
        token_nonce: m.token_nonce,
    })
}

fn target_patch_from(m: target_patches::Model) -> Result<TargetPatch> {
    Ok(TargetPatch {
        patch_index: m.patch_index as u32,
        state: parse(&m.state, "patch state")?,
        exit_code: m.exit_code,
        outcome: m.outcome,
        reboot_required: m.reboot_required,
        output_tail: m.output_tail,
        error: m.error,
        started_at: m.started_at,
        finished_at: m.finished_at,
    })
}

fn state_strs(states: &[TargetState]) -> Vec<&'static str> {
    states.iter().map(|s| s.as_str()).collect()
}

// ---------------------------------------------------------------- outbox helpers

#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct StoredHeaders {
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at_unix_ms: Option<i64>,
}

/// Appends `messages` to the outbox, in order (the relay publishes by id).
///
/// On PostgreSQL a statement per 1,000 messages whose text never changes
/// (the messages travel as arrays), so each connection parses and plans it
/// once (a multi-row `VALUES` list is a new statement for every new count);
/// elsewhere multi-row inserts.
pub(crate) async fn push_outbox<C: ConnectionTrait>(
    db: &C,
    created_at: DateTime<Utc>,
    messages: Vec<Outgoing>,
) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    let rows: Vec<_> = messages
        .into_iter()
        .map(|message| {
            let message = message.with_trace_context();
            let exchange = match message.destination {
                fleetpatch_bus::Destination::Work => "work",
                fleetpatch_bus::Destination::Events => "events",
            };
            let headers = to_json(&StoredHeaders { headers: message.headers, due_at_unix_ms: message.due_at_unix_ms });
            (exchange, message.routing_key, message.payload, headers)
        })
        .collect();
    // Chunks keep each statement's parameters small whatever the count.
    for chunk in rows.chunks(INSERT_CHUNK) {
        if db.get_database_backend() == DbBackend::Postgres {
            use sea_orm::sea_query::ArrayType;
            let values = vec![
                pg_array(ArrayType::String, chunk.iter().map(|row| row.0)),
                pg_array(ArrayType::String, chunk.iter().map(|row| row.1.clone())),
                pg_array(ArrayType::Bytes, chunk.iter().map(|row| row.2.clone())),
                pg_array(ArrayType::String, chunk.iter().map(|row| row.3.to_string())),
                created_at.into(),
            ];
            let statement = sea_orm::Statement::from_sql_and_values(DbBackend::Postgres, PUSH_OUTBOX_POSTGRES, values);
            db.execute(statement).await?;
            continue;
        }
        let models = chunk.iter().map(|(exchange, routing_key, payload, headers)| outbox::ActiveModel {
            exchange: Set((*exchange).into()),
            routing_key: Set(routing_key.clone()),
            payload: Set(payload.clone()),
            headers: Set(headers.clone()),
            created_at: Set(created_at),
            ..Default::default()
        });
        outbox::Entity::insert_many(models).exec_without_returning(db).await?;
    }
    Ok(())
}

/// [`push_outbox`] on PostgreSQL: the rows in the arrays' order, so their
/// ids (the relay's order) follow it.
const PUSH_OUTBOX_POSTGRES: &str = "INSERT INTO outbox (exchange, routing_key, payload, headers, created_at) \
     SELECT m.exchange, m.routing_key, m.payload, m.headers::json, $5 \
     FROM unnest($1::text[], $2::text[], $3::bytea[], $4::text[]) WITH ORDINALITY \
          AS m(exchange, routing_key, payload, headers, n) \
     ORDER BY m.n";

/// `column IN (ids)`. On PostgreSQL `column = ANY($n)` with the ids as one
/// array parameter: the statement's text is the same for any number of ids,
/// so it is parsed and planned once per connection, not once per count.
pub(crate) fn id_in(backend: DbBackend, column: impl ColumnTrait, ids: impl IntoIterator<Item = Uuid>) -> SimpleExpr {
    if backend == DbBackend::Postgres {
        use sea_orm::sea_query::{extension::postgres::PgFunc, ArrayType};
        Expr::col((column.entity_name(), column)).eq(PgFunc::any(Expr::val(pg_array(ArrayType::Uuid, ids))))
    } else {
        column.is_in(ids)
    }
}

/// A request to run a rollout's dispatch pass (the reconciler sends them too).
pub fn dispatch_request(rollout_id: Uuid) -> Outgoing {
    dispatch_message(rollout_id)
}

fn dispatch_message(rollout_id: Uuid) -> Outgoing {
    Outgoing::work(routing::DISPATCH, v1::DispatchRequest { rollout_id: rollout_id.to_string() }.encode_to_vec())
}

/// A deploy job for a target's attempt and try (the reconciler re-publishes them too).
pub(crate) fn deploy_job(target_id: Uuid, rollout_id: Uuid, attempt: u32, try_: u32) -> Outgoing {
    deploy_message(target_id, rollout_id, attempt, try_)
}

fn deploy_message(target_id: Uuid, rollout_id: Uuid, attempt: u32, try_: u32) -> Outgoing {
    Outgoing::work(
        routing::DEPLOY,
        v1::DeployJob { target_id: target_id.to_string(), rollout_id: rollout_id.to_string(), attempt, r#try: try_ }
            .encode_to_vec(),
    )
}

fn cleanup_message(target_id: Uuid, attempt: u32) -> Outgoing {
    Outgoing::work(routing::CLEANUP, v1::CleanupJob { target_id: target_id.to_string(), attempt }.encode_to_vec())
}

/// The watchdog's wake-up for a target, due at `due`.
pub fn watch_message(target_id: Uuid, attempt: u32, due: DateTime<Utc>) -> Outgoing {
    let due_ms = due.timestamp_millis();
    Outgoing::work(
        routing::WATCH,
        v1::WatchTimer { target_id: target_id.to_string(), attempt, due_at_unix_ms: due_ms }.encode_to_vec(),
    )
    .due_at(due_ms)
}

fn event_message(
    target_id: Uuid,
    rollout_id: Uuid,
    from: TargetState,
    to: TargetState,
    detail: &str,
    at: DateTime<Utc>,
) -> Outgoing {
    Outgoing::event(
        routing::target_event_key(to.as_str()),
        v1::TargetEvent {
            target_id: target_id.to_string(),
            rollout_id: rollout_id.to_string(),
            from_state: from.as_str().into(),
            to_state: to.as_str().into(),
            at_unix_ms: at.timestamp_millis(),
            detail: detail.into(),
        }
        .encode_to_vec(),
    )
}

// ---------------------------------------------------------------- outcomes

/// What a dispatch did.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchOutcome {
    pub dispatched: u32,
    pub state: RolloutState,
    /// Set when this dispatch halted the rollout at a wave's failure
    /// threshold (paused) or at a wave that needs approval (awaiting_approval).
    pub halted: Option<String>,
}

/// A worker's claim on a deploy job.
#[derive(Debug)]
pub enum Claim {
    Claimed(Box<DeployContext>),
    /// The job is for another attempt, or the target moved on: nothing to do.
    Skip {
        state: TargetState,
        attempt: u32,
    },
}

/// Where the deployment goes after the probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Stage and start the agent.
    Stage,
    /// Every patch was already installed: the target succeeded.
    AllInstalled,
    /// The target moved on meanwhile (e.g. the rollout was retried).
    Lost,
}

/// What the watchdog found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchOutcome {
    /// The target is no longer running this attempt.
    Gone,
    /// Reported recently: check again at the new deadline.
    NotYet(DateTime<Utc>),
    /// Marked timed out.
    TimedOut,
}

/// Settings of the watchdog's timeout handling.
#[derive(Debug, Clone, Copy)]
pub struct TimeoutPolicy {
    /// Delay before the verification scan after a timeout.
    pub verify_delay: Duration,
}

// ---------------------------------------------------------------- the operations

/// `targets.state IN (…in flight…)` with the states written out as
/// literals: PostgreSQL uses the partial index `targets_in_flight_v2` only when
/// it can prove the query's condition implies the index's, which a list of
/// bound parameters never does.
fn in_flight_literal() -> SimpleExpr {
    Expr::cust(format!("\"targets\".\"state\" IN ({})", in_flight_sql()))
}

/// The in-flight states as an SQL list of literals: `'queued', 'probing', …`.
fn in_flight_sql() -> String {
    states_sql(&TargetState::IN_FLIGHT)
}

/// `states` as an SQL list of literals: `'probing', 'staging', …`.
fn states_sql(states: &[TargetState]) -> String {
    states.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(", ")
}

/// A wave's failed and timed-out targets, against its failure threshold.
struct WaveFailures {
    failures: u64,
    total: u64,
    threshold: f64,
}

impl WaveFailures {
    fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.failures as f64 * 100.0 / self.total as f64
        }
    }

    fn over_threshold(&self) -> bool {
        self.percent() > self.threshold
    }
}

/// Counts a wave's targets and those of them that failed or timed out.
async fn wave_failures(txn: &DatabaseTransaction, rollout: &Rollout, wave: u32) -> Result<WaveFailures> {
    let in_wave = || {
        targets::Entity::find()
            .filter(targets::Column::RolloutId.eq(rollout.id))
            .filter(targets::Column::Wave.eq(wave as i32))
    };
    let total = in_wave().count(txn).await?;
    let failures = in_wave()
        .filter(targets::Column::State.is_in(state_strs(&[TargetState::Failed, TargetState::TimedOut])))
        .count(txn)
        .await?;
    let threshold = rollout.waves.get(wave as usize).map(|w| w.max_failure_percent).unwrap_or(100.0);
    Ok(WaveFailures { failures, total, threshold })
}

/// Whether any target of the rollout's wave matches `condition`.
async fn wave_has<C: ConnectionTrait>(db: &C, rollout_id: Uuid, wave: u32, condition: SimpleExpr) -> Result<bool> {
    let found = targets::Entity::find()
        .select_only()
        .column(targets::Column::Id)
        .filter(targets::Column::RolloutId.eq(rollout_id))
        .filter(targets::Column::Wave.eq(wave as i32))
        .filter(condition)
        .limit(1)
        .into_tuple::<Uuid>()
        .one(db)
        .await?;
    Ok(found.is_some())
}

/// Marks every unfinished patch of these targets failed with `reason`.
async fn fail_open_patches<C: ConnectionTrait>(
    db: &C,
    target_ids: impl IntoIterator<Item = Uuid>,
    reason: &str,
    at: DateTime<Utc>,
) -> Result<()> {
    target_patches::Entity::update_many()
        .col_expr(target_patches::Column::State, Expr::value(PatchState::Failed.as_str()))
        .col_expr(target_patches::Column::Error, Expr::value(reason))
        .col_expr(target_patches::Column::FinishedAt, Expr::value(at))
        .filter(id_in(db.get_database_backend(), target_patches::Column::TargetId, target_ids))
        .filter(target_patches::Column::State.is_in([PatchState::Pending.as_str(), PatchState::Running.as_str()]))
        .exec(db)
        .await?;
    Ok(())
}

impl Store {
    // ------------------------------------------------------------ rollouts

    pub async fn rollout(&self, id: Uuid) -> Result<Rollout> {
        let model = rollouts::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound { what: "rollout", id: id.to_string() })?;
        rollout_from(model)
    }

    /// Newest first.
    pub async fn list_rollouts(&self, limit: u64) -> Result<Vec<Rollout>> {
        rollouts::Entity::find()
            .order_by_desc(rollouts::Column::CreatedAt)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(rollout_from)
            .collect()
    }

    pub async fn patches(&self, rollout_id: Uuid) -> Result<Vec<Patch>> {
        patches::Entity::find()
            .filter(patches::Column::RolloutId.eq(rollout_id))
            .order_by_asc(patches::Column::PatchIndex)
            .all(&self.db)
            .await?
            .into_iter()
            .map(patch_from)
            .collect()
    }

    /// Counts per state, for the rollout and per wave.
    pub async fn progress(&self, rollout: &Rollout) -> Result<Progress> {
        let rows: Vec<(i32, String, i64)> = targets::Entity::find()
            .select_only()
            .column(targets::Column::Wave)
            .column(targets::Column::State)
            .column_as(targets::Column::Id.count(), "n")
            .filter(targets::Column::RolloutId.eq(rollout.id))
            .group_by(targets::Column::Wave)
            .group_by(targets::Column::State)
            .into_tuple()
            .all(&self.db)
            .await?;
        let mut progress = Progress {
            waves: rollout
                .waves
                .iter()
                .enumerate()
                .map(|(index, wave)| WaveProgress {
                    index: index as u32,
                    name: wave.name.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        for (wave, state, count) in rows {
            let count = count as u64;
            progress.total += count;
            *progress.by_state.entry(state.clone()).or_default() += count;
            if let Some(wave) = progress.waves.get_mut(wave as usize) {
                wave.total += count;
                *wave.by_state.entry(state).or_default() += count;
            }
        }
        Ok(progress)
    }

    /// A page of a rollout's targets in dispatch order, after `after_ordinal`.
    pub async fn targets(
        &self,
        rollout_id: Uuid,
        state: Option<TargetState>,
        after_ordinal: Option<u32>,
        limit: u64,
    ) -> Result<Vec<Target>> {
        let filter = console::TargetFilter { state, ..console::TargetFilter::default() };
        self.targets_page(rollout_id, &filter, after_ordinal, limit).await
    }

    pub async fn target(&self, id: Uuid) -> Result<Target> {
        let model = targets::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound { what: "target", id: id.to_string() })?;
        target_from(model)
    }

    pub async fn target_patches(&self, target_id: Uuid) -> Result<Vec<TargetPatch>> {
        target_patches::Entity::find()
            .filter(target_patches::Column::TargetId.eq(target_id))
            .order_by_asc(target_patches::Column::PatchIndex)
            .all(&self.db)
            .await?
            .into_iter()
            .map(target_patch_from)
            .collect()
    }

    /// The target's state changes, oldest first.
    pub async fn transitions(&self, target_id: Uuid) -> Result<Vec<Transition>> {
        self.transitions_where(target_transitions::Column::TargetId.eq(target_id)).await
    }

    /// Every state change of a rollout's targets, oldest first.
    pub async fn rollout_transitions(&self, rollout_id: Uuid) -> Result<Vec<Transition>> {
        self.transitions_where(target_transitions::Column::RolloutId.eq(rollout_id)).await
    }

    async fn transitions_where(&self, filter: sea_orm::sea_query::SimpleExpr) -> Result<Vec<Transition>> {
        Ok(target_transitions::Entity::find()
            .filter(filter)
            .order_by_asc(target_transitions::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(transition_from)
            .collect())
    }

    /// What the collector accepted from the target's agents, oldest first.
    pub async fn agent_events(&self, target_id: Uuid) -> Result<Vec<AgentEvent>> {
        self.agent_events_page(target_id, None, u64::MAX).await
    }

    /// A target's events in (attempt, seq, agent instance) order, after
    /// `after` (the last event of the previous page), at most `limit` of them.
    pub async fn agent_events_page(
        &self,
        target_id: Uuid,
        after: Option<EventCursor>,
        limit: u64,
    ) -> Result<Vec<AgentEvent>> {
        use agent_events::Column;
        let mut query = agent_events::Entity::find().filter(Column::TargetId.eq(target_id));
        if let Some(cursor) = after {
            let (attempt, seq) = (cursor.attempt as i32, i64::try_from(cursor.seq).unwrap_or(i64::MAX));
            let same_seq = match cursor.agent_instance {
                // After every event at (attempt, seq).
                None => Condition::all().add(Column::Seq.gt(seq)),
                Some(instance) => Condition::any()
                    .add(Column::Seq.gt(seq))
                    .add(Condition::all().add(Column::Seq.eq(seq)).add(Column::AgentInstance.gt(instance.to_column()))),
            };
            query = query.filter(
                Condition::any()
                    .add(Column::Attempt.gt(attempt))
                    .add(Condition::all().add(Column::Attempt.eq(attempt)).add(same_seq)),
            );
        }
        let query = query.order_by_asc(Column::Attempt).order_by_asc(Column::Seq).order_by_asc(Column::AgentInstance);
        let query = if limit == u64::MAX { query } else { query.limit(limit) };
        Ok(query
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| AgentEvent {
                attempt: m.attempt as u32,
                agent_instance: AgentInstance::from_column(m.agent_instance),
                seq: m.seq as u64,
                kind: m.kind,
                patch_index: m.patch_index.map(|i| i as u32),
                exit_code: m.exit_code,
                detail: m.detail,
                received_at: m.received_at,
            })
            .collect())
    }
}

#[cfg(feature = "ceiling")]
mod bench_support;
pub(crate) mod console;
mod create;
pub use create::RolloutIntake;
mod cursor;
mod dispatch;
mod evidence;
mod heartbeats;
mod intake;
mod last_seen;
mod offline;
mod reboot;
pub(crate) use intake::pg_array;
pub use intake::ReportIntake;
mod operator;
mod transition;
mod watchdog;
mod worker;

/// See [`Store::fleet_gauges`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetGauges {
    pub rollouts_by_state: BTreeMap<String, u64>,
    pub active_targets_by_state: BTreeMap<String, u64>,
    pub outbox_pending: u64,
}

/// A target's token hash, the attempt and nonce the token was derived
/// with, and the target's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub token_hash: String,
    pub token_nonce: String,
    pub attempt: u32,
    pub rollout_id: Uuid,
    pub state: TargetState,
}
