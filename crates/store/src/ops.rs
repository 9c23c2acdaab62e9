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

const INSERT_CHUNK: usize = 1_000;

// ---------------------------------------------------------------- conversions

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

pub(crate) async fn push_outbox<C: ConnectionTrait>(
    db: &C,
    created_at: DateTime<Utc>,
    messages: Vec<Outgoing>,
) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    for chunk in messages.chunks(INSERT_CHUNK) {
        let rows = chunk.iter().map(|message| {
            let message = message.clone().with_trace_context();
            outbox::ActiveModel {
                exchange: Set(match message.destination {
                    fleetpatch_bus::Destination::Work => "work".into(),
                    fleetpatch_bus::Destination::Events => "events".into(),
                }),
                routing_key: Set(message.routing_key),
                payload: Set(message.payload),
                headers: Set(to_json(&StoredHeaders {
                    headers: message.headers,
                    due_at_unix_ms: message.due_at_unix_ms,
                })),
                created_at: Set(created_at),
                ..Default::default()
            }
        });
        outbox::Entity::insert_many(rows).exec_without_returning(db).await?;
    }
    Ok(())
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
    /// Set when this dispatch halted the rollout at a wave's failure threshold.
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

struct Move<'a> {
    rollout_id: Uuid,
    target_id: Uuid,
    attempt: Option<u32>,
    from: &'a [TargetState],
    to: TargetState,
    detail: Option<String>,
    sets: Vec<(targets::Column, SimpleExpr)>,
}

/// `targets.state IN (…in flight…)` with the states written out as
/// literals: PostgreSQL uses the partial index `targets_in_flight` only when
/// it can prove the query's condition implies the index's, which a list of
/// bound parameters never does.
fn in_flight_literal() -> SimpleExpr {
    Expr::cust(format!("\"targets\".\"state\" IN ({})", in_flight_sql()))
}

/// The in-flight states as an SQL list of literals: `'queued', 'probing', …`.
fn in_flight_sql() -> String {
    TargetState::IN_FLIGHT.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(", ")
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

/// Moves the wave's next `limit` pending targets (by ordinal) to `queued`,
/// with their history; returns them with their attempts.
///
/// The rows are locked as they are read, so the UPDATE goes by primary key
/// alone: a state condition beside the ids lets PostgreSQL combine the
/// primary key with the `targets_state` index (a bitmap AND), which reads
/// every entry of that state, dead versions included, for a handful of rows.
async fn queue_next(
    txn: &DatabaseTransaction,
    rollout_id: Uuid,
    wave: u32,
    limit: u64,
    at: DateTime<Utc>,
) -> Result<Vec<(Uuid, i32)>> {
    let pending = || targets::Column::State.eq(TargetState::Pending.as_str());
    let next: Vec<(Uuid, i32)> = targets::Entity::find()
        .select_only()
        .column(targets::Column::Id)
        .column(targets::Column::Attempt)
        .filter(targets::Column::RolloutId.eq(rollout_id))
        .filter(targets::Column::Wave.eq(wave as i32))
        .filter(pending())
        .order_by_asc(targets::Column::Ordinal)
        .limit(limit)
        .lock(LockType::NoKeyUpdate)
        .into_tuple()
        .all(txn)
        .await?;
    if next.is_empty() {
        return Ok(next);
    }
    targets::Entity::update_many()
        .col_expr(targets::Column::State, Expr::value(TargetState::Queued.as_str()))
        .col_expr(targets::Column::QueuedAt, Expr::value(at))
        .col_expr(targets::Column::Try, Expr::value(0))
        .col_expr(targets::Column::UpdatedAt, Expr::value(at))
        .filter(targets::Column::Id.is_in(next.iter().map(|(id, _)| *id)))
        .exec(txn)
        .await?;
    let rows = next.iter().map(|(target_id, _)| target_transitions::ActiveModel {
        rollout_id: Set(rollout_id),
        target_id: Set(*target_id),
        from_state: Set(TargetState::Pending.as_str().into()),
        to_state: Set(TargetState::Queued.as_str().into()),
        at: Set(at),
        detail: Set(None),
        ..Default::default()
    });
    target_transitions::Entity::insert_many(rows).exec_without_returning(txn).await?;
    Ok(next)
}

/// Locks the target row, checks the move, applies it as a guarded UPDATE and
/// appends it to the history. Returns the state it moved from, or `None`
/// when the guard did not match (a duplicate, or the target moved on).
async fn apply_move(txn: &DatabaseTransaction, at: DateTime<Utc>, mv: Move<'_>) -> Result<Option<TargetState>> {
    let current = targets::Entity::find_by_id(mv.target_id)
        .select_only()
        .column(targets::Column::State)
        .column(targets::Column::Attempt)
        .lock(LockType::NoKeyUpdate)
        .into_tuple::<(String, i32)>()
        .one(txn)
        .await?;
    let Some((state, attempt)) = current else { return Ok(None) };
    let from: TargetState = parse(&state, "target state")?;
    if !mv.from.contains(&from) || mv.attempt.is_some_and(|a| a as i32 != attempt) {
        return Ok(None);
    }
    debug_assert!(from.can_move_to(mv.to) || from == mv.to, "{from} -> {}", mv.to);
    let mut update = targets::Entity::update_many()
        .col_expr(targets::Column::State, Expr::value(mv.to.as_str()))
        .col_expr(targets::Column::UpdatedAt, Expr::value(at));
    for (column, value) in mv.sets {
        update = update.col_expr(column, value);
    }
    let updated = update
        .filter(targets::Column::Id.eq(mv.target_id))
        .filter(targets::Column::State.eq(from.as_str()))
        .filter(targets::Column::Attempt.eq(attempt))
        .exec(txn)
        .await?;
    if updated.rows_affected != 1 {
        return Ok(None);
    }
    target_transitions::Entity::insert(target_transitions::ActiveModel {
        rollout_id: Set(mv.rollout_id),
        target_id: Set(mv.target_id),
        from_state: Set(from.as_str().into()),
        to_state: Set(mv.to.as_str().into()),
        at: Set(at),
        detail: Set(mv.detail),
        ..Default::default()
    })
    .exec_without_returning(txn)
    .await?;
    Ok(Some(from))
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
        .filter(target_patches::Column::TargetId.is_in(target_ids))
        .filter(target_patches::Column::State.is_in([PatchState::Pending.as_str(), PatchState::Running.as_str()]))
        .exec(db)
        .await?;
    Ok(())
}

impl Store {
    // ------------------------------------------------------------ rollouts

    /// Stores a new rollout (running) and asks the scheduler to dispatch it.
    pub async fn create_rollout(&self, new: NewRollout) -> Result<Uuid> {
        let id = Uuid::new_v4();
        let at = self.now();
        let txn = self.begin().await?;
        rollouts::Entity::insert(rollouts::ActiveModel {
            id: Set(id),
            name: Set(new.name.clone()),
            state: Set(RolloutState::Running.as_str().into()),
            pause_reason: Set(None),
            current_wave: Set(0),
            concurrency: Set(new.concurrency as i32),
            timeout_seconds: Set(new.timeout_seconds as i32),
            waves: Set(to_json(&new.waves)),
            settings: Set(to_json(&new.settings)),
            created_at: Set(at),
            updated_at: Set(at),
            completed_at: Set(None),
        })
        .exec_without_returning(&txn)
        .await?;
        if !new.patches.is_empty() {
            let rows = new.patches.iter().enumerate().map(|(index, p)| patches::ActiveModel {
                rollout_id: Set(id),
                patch_index: Set(index as i32),
                name: Set(p.name.clone()),
                kb: Set(p.kb.clone()),
                file: Set(p.file.clone()),
                sha256: Set(p.sha256.clone()),
                size: Set(p.size as i64),
                installer: Set(p.installer.as_str().into()),
                arguments: Set(p.arguments.clone()),
                success_codes: Set(to_json(&p.success_codes)),
                reboot_codes: Set(to_json(&p.reboot_codes)),
                timeout_seconds: Set(p.timeout_seconds as i32),
                detection: Set(p.detection.as_ref().map(to_json)),
            });
            patches::Entity::insert_many(rows).exec_without_returning(&txn).await?;
        }
        for (chunk_index, chunk) in new.targets.chunks(INSERT_CHUNK).enumerate() {
            let rows = chunk.iter().enumerate().map(|(i, t)| targets::ActiveModel {
                id: Set(Uuid::new_v4()),
                rollout_id: Set(id),
                ordinal: Set((chunk_index * INSERT_CHUNK + i) as i32),
                host: Set(t.host.clone()),
                port: Set(t.port.map(i32::from)),
                transport: Set(t.transport.clone()),
                labels: Set(to_json(&t.labels)),
                credential: Set(t.credential.clone()),
                wave: Set(t.wave as i32),
                state: Set(TargetState::Pending.as_str().into()),
                attempt: Set(1),
                r#try: Set(0),
                token_hash: Set(None),
                token_nonce: Set(None),
                timeout_seconds: Set(new.timeout_seconds as i32),
                last_seen_at: Set(None),
                error: Set(None),
                os: Set(None),
                arch: Set(None),
                probe: Set(None),
                queued_at: Set(None),
                running_at: Set(None),
                finished_at: Set(None),
                verified_state: Set(None),
                verified_at: Set(None),
                created_at: Set(at),
                updated_at: Set(at),
            });
            targets::Entity::insert_many(rows).exec_without_returning(&txn).await?;
        }
        push_outbox(&txn, at, vec![dispatch_message(id)]).await?;
        txn.commit().await?;
        Ok(id)
    }

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
        let mut query = targets::Entity::find().filter(targets::Column::RolloutId.eq(rollout_id));
        if let Some(state) = state {
            query = query.filter(targets::Column::State.eq(state.as_str()));
        }
        if let Some(after) = after_ordinal {
            query = query.filter(targets::Column::Ordinal.gt(after as i32));
        }
        query
            .order_by_asc(targets::Column::Ordinal)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(target_from)
            .collect()
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
            .map(|m| Transition {
                target_id: m.target_id,
                from: m.from_state,
                to: m.to_state,
                at: m.at,
                detail: m.detail,
            })
            .collect())
    }

    /// What the collector accepted from the target's agents, oldest first.
    pub async fn agent_events(&self, target_id: Uuid) -> Result<Vec<AgentEvent>> {
        self.agent_events_page(target_id, None, u64::MAX).await
    }

    /// A target's events in (attempt, seq) order, after `after` (an
    /// (attempt, seq) cursor: the last event of the previous page), at most
    /// `limit` of them.
    pub async fn agent_events_page(
        &self,
        target_id: Uuid,
        after: Option<(u32, u64)>,
        limit: u64,
    ) -> Result<Vec<AgentEvent>> {
        let mut query = agent_events::Entity::find().filter(agent_events::Column::TargetId.eq(target_id));
        if let Some((attempt, seq)) = after {
            let (attempt, seq) = (attempt as i32, i64::try_from(seq).unwrap_or(i64::MAX));
            query = query.filter(Condition::any().add(agent_events::Column::Attempt.gt(attempt)).add(
                Condition::all().add(agent_events::Column::Attempt.eq(attempt)).add(agent_events::Column::Seq.gt(seq)),
            ));
        }
        let query = query.order_by_asc(agent_events::Column::Attempt).order_by_asc(agent_events::Column::Seq);
        let query = if limit == u64::MAX { query } else { query.limit(limit) };
        Ok(query
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| AgentEvent {
                attempt: m.attempt as u32,
                seq: m.seq as u64,
                kind: m.kind,
                patch_index: m.patch_index.map(|i| i as u32),
                exit_code: m.exit_code,
                detail: m.detail,
                received_at: m.received_at,
            })
            .collect())
    }

    // ------------------------------------------------------------ operator actions

    async fn set_rollout_state(
        &self,
        id: Uuid,
        from: &[RolloutState],
        to: RolloutState,
        reason: Option<String>,
    ) -> Result<Rollout> {
        let txn = self.begin().await?;
        let rollout = rollouts::Entity::find_by_id(id)
            .lock(LockType::NoKeyUpdate)
            .one(&txn)
            .await?
            .ok_or_else(|| Error::NotFound { what: "rollout", id: id.to_string() })?;
        let current: RolloutState = parse(&rollout.state, "rollout state")?;
        if !from.contains(&current) {
            return Err(Error::Conflict(format!(
                "rollout {id} is {current}; it can be made {to} only when it is {}",
                from.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" or ")
            )));
        }
        let at = self.now();
        rollouts::Entity::update_many()
            .col_expr(rollouts::Column::State, Expr::value(to.as_str()))
            .col_expr(rollouts::Column::PauseReason, Expr::value(reason))
            .col_expr(rollouts::Column::UpdatedAt, Expr::value(at))
            .filter(rollouts::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        match to {
            RolloutState::Running => push_outbox(&txn, at, vec![dispatch_message(id)]).await?,
            RolloutState::Aborted => {
                let pending = targets::Entity::find()
                    .select_only()
                    .column(targets::Column::Id)
                    .filter(targets::Column::RolloutId.eq(id))
                    .filter(targets::Column::State.eq(TargetState::Pending.as_str()))
                    .into_tuple::<Uuid>()
                    .all(&txn)
                    .await?;
                for chunk in pending.chunks(INSERT_CHUNK) {
                    targets::Entity::update_many()
                        .col_expr(targets::Column::State, Expr::value(TargetState::Cancelled.as_str()))
                        .col_expr(targets::Column::FinishedAt, Expr::value(at))
                        .col_expr(targets::Column::UpdatedAt, Expr::value(at))
                        .filter(targets::Column::Id.is_in(chunk.iter().copied()))
                        .filter(targets::Column::State.eq(TargetState::Pending.as_str()))
                        .exec(&txn)
                        .await?;
                    let rows = chunk.iter().map(|target_id| target_transitions::ActiveModel {
                        rollout_id: Set(id),
                        target_id: Set(*target_id),
                        from_state: Set(TargetState::Pending.as_str().into()),
                        to_state: Set(TargetState::Cancelled.as_str().into()),
                        at: Set(at),
                        detail: Set(Some("rollout aborted".into())),
                        ..Default::default()
                    });
                    target_transitions::Entity::insert_many(rows).exec_without_returning(&txn).await?;
                }
                rollouts::Entity::update_many()
                    .col_expr(rollouts::Column::CompletedAt, Expr::value(at))
                    .filter(rollouts::Column::Id.eq(id))
                    .exec(&txn)
                    .await?;
            }
            _ => {}
        }
        txn.commit().await?;
        self.rollout(id).await
    }

    pub async fn pause_rollout(&self, id: Uuid, reason: &str) -> Result<Rollout> {
        self.set_rollout_state(id, &[RolloutState::Running], RolloutState::Paused, Some(reason.into())).await
    }

    pub async fn resume_rollout(&self, id: Uuid) -> Result<Rollout> {
        self.set_rollout_state(id, &[RolloutState::Paused], RolloutState::Running, None).await
    }

    pub async fn abort_rollout(&self, id: Uuid) -> Result<Rollout> {
        self.set_rollout_state(
            id,
            &[RolloutState::Running, RolloutState::Paused],
            RolloutState::Aborted,
            Some("aborted by an operator".into()),
        )
        .await
    }

    /// Sends failed and timed-out targets back to `pending` for a new
    /// attempt, and restarts dispatch from the earliest wave among them.
    pub async fn retry_failed(&self, id: Uuid) -> Result<u64> {
        let txn = self.begin().await?;
        let rollout = rollouts::Entity::find_by_id(id)
            .lock(LockType::NoKeyUpdate)
            .one(&txn)
            .await?
            .ok_or_else(|| Error::NotFound { what: "rollout", id: id.to_string() })?;
        if rollout.state == RolloutState::Aborted.as_str() {
            return Err(Error::Conflict(format!("rollout {id} was aborted; create a new rollout instead")));
        }
        let failed = state_strs(&[TargetState::Failed, TargetState::TimedOut]);
        let retried: Vec<(Uuid, String, i32)> = targets::Entity::find()
            .select_only()
            .column(targets::Column::Id)
            .column(targets::Column::State)
            .column(targets::Column::Wave)
            .filter(targets::Column::RolloutId.eq(id))
            .filter(targets::Column::State.is_in(failed.clone()))
            .into_tuple()
            .all(&txn)
            .await?;
        let Some(first_wave) = retried.iter().map(|(_, _, wave)| *wave).min() else {
            return Ok(0);
        };
        let at = self.now();
        for chunk in retried.chunks(INSERT_CHUNK) {
            let ids: Vec<Uuid> = chunk.iter().map(|(target_id, _, _)| *target_id).collect();
            targets::Entity::update_many()
                .col_expr(targets::Column::State, Expr::value(TargetState::Pending.as_str()))
                .col_expr(targets::Column::Attempt, Expr::col(targets::Column::Attempt).add(1))
                .col_expr(targets::Column::Try, Expr::value(0))
                .col_expr(targets::Column::TokenHash, Expr::value(Option::<String>::None))
                .col_expr(targets::Column::TokenNonce, Expr::value(Option::<String>::None))
                .col_expr(targets::Column::Error, Expr::value(Option::<String>::None))
                .col_expr(targets::Column::LastSeenAt, Expr::value(Option::<DateTime<Utc>>::None))
                .col_expr(targets::Column::QueuedAt, Expr::value(Option::<DateTime<Utc>>::None))
                .col_expr(targets::Column::RunningAt, Expr::value(Option::<DateTime<Utc>>::None))
                .col_expr(targets::Column::FinishedAt, Expr::value(Option::<DateTime<Utc>>::None))
                .col_expr(targets::Column::UpdatedAt, Expr::value(at))
                .filter(targets::Column::Id.is_in(ids.clone()))
                .filter(targets::Column::State.is_in(failed.clone()))
                .exec(&txn)
                .await?;
            target_patches::Entity::delete_many()
                .filter(target_patches::Column::TargetId.is_in(ids))
                .exec(&txn)
                .await?;
            let rows = chunk.iter().map(|(target_id, state, _)| target_transitions::ActiveModel {
                rollout_id: Set(id),
                target_id: Set(*target_id),
                from_state: Set(state.clone()),
                to_state: Set(TargetState::Pending.as_str().into()),
                at: Set(at),
                detail: Set(Some("retry failed".into())),
                ..Default::default()
            });
            target_transitions::Entity::insert_many(rows).exec_without_returning(&txn).await?;
        }
        rollouts::Entity::update_many()
            .col_expr(rollouts::Column::State, Expr::value(RolloutState::Running.as_str()))
            .col_expr(rollouts::Column::PauseReason, Expr::value(Option::<String>::None))
            .col_expr(rollouts::Column::CurrentWave, Expr::value(first_wave.min(rollout.current_wave)))
            .col_expr(rollouts::Column::CompletedAt, Expr::value(Option::<DateTime<Utc>>::None))
            .col_expr(rollouts::Column::UpdatedAt, Expr::value(at))
            .filter(rollouts::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        push_outbox(&txn, at, vec![dispatch_message(id)]).await?;
        txn.commit().await?;
        Ok(retried.len() as u64)
    }

    // ------------------------------------------------------------ dispatch

    /// Fills the rollout's free slots with its next pending targets, and
    /// moves through waves. Serialized per rollout by a row lock, so no two
    /// dispatches can exceed `concurrency` together.
    pub async fn dispatch(&self, rollout_id: Uuid) -> Result<DispatchOutcome> {
        let txn = self.begin().await?;
        let rollout = rollouts::Entity::find_by_id(rollout_id)
            .lock(LockType::NoKeyUpdate)
            .one(&txn)
            .await?
            .ok_or_else(|| Error::NotFound { what: "rollout", id: rollout_id.to_string() })?;
        let rollout = rollout_from(rollout)?;
        let mut outcome = DispatchOutcome { dispatched: 0, state: rollout.state, halted: None };
        if rollout.state != RolloutState::Running {
            return Ok(outcome);
        }
        let mut wave = rollout.current_wave;
        let wave_count = rollout.waves.len().max(1) as u32;
        let mut messages = Vec::new();
        let at = self.now();
        let pending = || targets::Column::State.eq(TargetState::Pending.as_str());
        loop {
            // The wave is open while any of its targets is pending or in
            // flight. Slots are counted only when there is something to put
            // in them: the count is the expensive part of a pass.
            if wave_has(&txn, rollout_id, wave, pending()).await? {
                if self.backend() == DbBackend::Postgres {
                    // The count runs over target rows that changed state several
                    // times since the last vacuum. A bitmap scan visits every
                    // dead index entry each time; a plain index scan marks the
                    // dead ones it meets (kill_prior_tuple) and later passes skip
                    // them (10,000 churned targets, no concurrent writers: 0.6 ms
                    // instead of 5 ms for the second count; pages that changed
                    // meanwhile keep their entries unmarked).
                    txn.execute_unprepared("SET LOCAL enable_bitmapscan = off").await?;
                }
                let in_flight = targets::Entity::find()
                    .filter(targets::Column::RolloutId.eq(rollout_id))
                    .filter(in_flight_literal())
                    .count(&txn)
                    .await?;
                let free = u64::from(rollout.concurrency).saturating_sub(in_flight);
                if free > 0 {
                    let queued = queue_next(&txn, rollout_id, wave, free, at).await?;
                    for (target_id, attempt) in &queued {
                        messages.push(deploy_message(*target_id, rollout_id, *attempt as u32, 0));
                    }
                    outcome.dispatched += queued.len() as u32;
                }
                break;
            }
            if wave_has(&txn, rollout_id, wave, in_flight_literal()).await? {
                break;
            }
            let total = targets::Entity::find()
                .filter(targets::Column::RolloutId.eq(rollout_id))
                .filter(targets::Column::Wave.eq(wave as i32))
                .count(&txn)
                .await?;
            let failures = targets::Entity::find()
                .filter(targets::Column::RolloutId.eq(rollout_id))
                .filter(targets::Column::Wave.eq(wave as i32))
                .filter(targets::Column::State.is_in(state_strs(&[TargetState::Failed, TargetState::TimedOut])))
                .count(&txn)
                .await?;
            let spec = rollout.waves.get(wave as usize);
            let threshold = spec.map(|w| w.max_failure_percent).unwrap_or(100.0);
            let failed_percent = if total == 0 { 0.0 } else { failures as f64 * 100.0 / total as f64 };
            if wave + 1 >= wave_count {
                outcome.state = RolloutState::Completed;
                break;
            }
            wave += 1;
            if failed_percent > threshold {
                let name = spec.map(|w| w.name.as_str()).unwrap_or("default");
                let reason = format!(
                    "wave {name:?} ended with {failures} of {total} targets failed or timed out ({failed_percent:.1}%), \
                     above its threshold of {threshold}%; resume to continue with the next wave"
                );
                outcome.state = RolloutState::Paused;
                outcome.halted = Some(reason);
                break;
            }
        }
        let mut update = rollouts::Entity::update_many()
            .col_expr(rollouts::Column::CurrentWave, Expr::value(wave as i32))
            .col_expr(rollouts::Column::State, Expr::value(outcome.state.as_str()))
            .col_expr(rollouts::Column::UpdatedAt, Expr::value(at));
        if let Some(reason) = &outcome.halted {
            update = update.col_expr(rollouts::Column::PauseReason, Expr::value(reason.clone()));
        }
        if outcome.state == RolloutState::Completed {
            update = update.col_expr(rollouts::Column::CompletedAt, Expr::value(at));
        }
        update.filter(rollouts::Column::Id.eq(rollout_id)).exec(&txn).await?;
        push_outbox(&txn, at, messages).await?;
        txn.commit().await?;
        Ok(outcome)
    }

    // ------------------------------------------------------------ worker steps

    /// Claims a deploy job: `queued → probing`. With `takeover` (the job was
    /// redelivered because its worker died), a target left in probing,
    /// staging or installing by that worker is taken over.
    pub async fn claim_deploy(&self, target_id: Uuid, attempt: u32, takeover: bool, nonce: &str) -> Result<Claim> {
        let at = self.now();
        let txn = self.begin().await?;
        let Some(target) = targets::Entity::find_by_id(target_id).one(&txn).await? else {
            return Err(Error::NotFound { what: "target", id: target_id.to_string() });
        };
        let target = target_from(target)?;
        let allowed: &[TargetState] = if takeover {
            &[TargetState::Queued, TargetState::Probing, TargetState::Staging, TargetState::Installing]
        } else {
            &[TargetState::Queued]
        };
        let detail = (target.state != TargetState::Queued).then(|| format!("taken over from {}", target.state));
        let moved = apply_move(
            &txn,
            at,
            Move {
                rollout_id: target.rollout_id,
                target_id,
                attempt: Some(attempt),
                from: allowed,
                to: TargetState::Probing,
                detail,
                sets: vec![(
                    targets::Column::TokenNonce,
                    Func::coalesce([Expr::col(targets::Column::TokenNonce).into(), Expr::value(nonce)]).into(),
                )],
            },
        )
        .await?;
        if moved.is_none() {
            return Ok(Claim::Skip { state: target.state, attempt: target.attempt });
        }
        let target = target_from(
            targets::Entity::find_by_id(target_id)
                .one(&txn)
                .await?
                .ok_or_else(|| Error::NotFound { what: "target", id: target_id.to_string() })?,
        )?;
        let rollout = rollout_from(
            rollouts::Entity::find_by_id(target.rollout_id)
                .one(&txn)
                .await?
                .ok_or_else(|| Error::NotFound { what: "rollout", id: target.rollout_id.to_string() })?,
        )?;
        let patches = patches::Entity::find()
            .filter(patches::Column::RolloutId.eq(target.rollout_id))
            .order_by_asc(patches::Column::PatchIndex)
            .all(&txn)
            .await?
            .into_iter()
            .map(patch_from)
            .collect::<Result<_>>()?;
        txn.commit().await?;
        Ok(Claim::Claimed(Box::new(DeployContext { target, rollout, patches })))
    }

    /// Records the probe: `probing → staging` (or `→ succeeded` when every
    /// patch is already installed), the per-patch rows, and the token hash.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_probe(
        &self,
        context: &DeployContext,
        os: &str,
        arch: &str,
        probe: serde_json::Value,
        installed: &[u32],
        token_hash: &str,
    ) -> Result<ProbeOutcome> {
        let target = &context.target;
        let all_installed = context.patches.iter().all(|p| installed.contains(&p.index));
        let to = if all_installed { TargetState::Succeeded } else { TargetState::Staging };
        let at = self.now();
        let txn = self.begin().await?;
        let mut sets = vec![
            (targets::Column::Os, Expr::value(os)),
            (targets::Column::Arch, Expr::value(arch)),
            (targets::Column::Probe, Expr::value(probe)),
            (targets::Column::TokenHash, Expr::value(token_hash)),
        ];
        if all_installed {
            sets.push((targets::Column::FinishedAt, Expr::value(at)));
        }
        let moved = apply_move(
            &txn,
            at,
            Move {
                rollout_id: target.rollout_id,
                target_id: target.id,
                attempt: Some(target.attempt),
                from: &[TargetState::Probing],
                to,
                detail: all_installed.then(|| "every patch is already installed".to_owned()),
                sets,
            },
        )
        .await?;
        let Some(from) = moved else { return Ok(ProbeOutcome::Lost) };
        // A worker taking over keeps what the running agent already reported.
        if !context.patches.is_empty() {
            let rows = context.patches.iter().map(|patch| {
                let skipped = installed.contains(&patch.index);
                target_patches::ActiveModel {
                    target_id: Set(target.id),
                    patch_index: Set(patch.index as i32),
                    rollout_id: Set(target.rollout_id),
                    state: Set(if skipped { PatchState::Skipped } else { PatchState::Pending }.as_str().into()),
                    exit_code: Set(None),
                    outcome: Set(skipped.then(|| "already_installed".to_owned())),
                    reboot_required: Set(false),
                    output_tail: Set(None),
                    error: Set(None),
                    started_at: Set(None),
                    finished_at: Set(None),
                }
            });
            target_patches::Entity::insert_many(rows)
                .on_conflict(
                    OnConflict::columns([target_patches::Column::TargetId, target_patches::Column::PatchIndex])
                        .do_nothing()
                        .to_owned(),
                )
                .do_nothing()
                .exec_without_returning(&txn)
                .await?;
        }
        if all_installed {
            // A worker taking over can find that the running agent already
            // installed everything: what it left open is installed, by the probe.
            target_patches::Entity::update_many()
                .col_expr(target_patches::Column::State, Expr::value(PatchState::Succeeded.as_str()))
                .col_expr(target_patches::Column::Outcome, Expr::value("found_installed"))
                .col_expr(target_patches::Column::FinishedAt, Expr::value(at))
                .filter(target_patches::Column::TargetId.eq(target.id))
                .filter(
                    target_patches::Column::State.is_in([PatchState::Pending.as_str(), PatchState::Running.as_str()]),
                )
                .exec(&txn)
                .await?;
            push_outbox(
                &txn,
                at,
                vec![
                    dispatch_message(target.rollout_id),
                    event_message(target.id, target.rollout_id, from, to, "every patch is already installed", at),
                ],
            )
            .await?;
        }
        txn.commit().await?;
        Ok(if all_installed { ProbeOutcome::AllInstalled } else { ProbeOutcome::Stage })
    }

    /// `staging → installing`. False when the target moved on.
    pub async fn mark_installing(&self, target: &Target) -> Result<bool> {
        let at = self.now();
        let txn = self.begin().await?;
        let moved = apply_move(
            &txn,
            at,
            Move {
                rollout_id: target.rollout_id,
                target_id: target.id,
                attempt: Some(target.attempt),
                from: &[TargetState::Staging],
                to: TargetState::Installing,
                detail: None,
                sets: vec![],
            },
        )
        .await?;
        txn.commit().await?;
        Ok(moved.is_some())
    }

    /// `installing → running`, arming the watchdog in the same transaction.
    /// False when the target moved on (e.g. its agent already reported its
    /// final result).
    pub async fn mark_running(&self, target: &Target) -> Result<bool> {
        let at = self.now();
        let due = at + chrono::Duration::seconds(i64::from(target.timeout_seconds));
        let txn = self.begin().await?;
        let moved = apply_move(
            &txn,
            at,
            Move {
                rollout_id: target.rollout_id,
                target_id: target.id,
                attempt: Some(target.attempt),
                from: &[TargetState::Installing],
                to: TargetState::Running,
                detail: None,
                sets: vec![
                    (targets::Column::RunningAt, Expr::value(at)),
                    (targets::Column::LastSeenAt, Expr::value(at)),
                ],
            },
        )
        .await?;
        if let Some(from) = moved {
            push_outbox(
                &txn,
                at,
                vec![
                    watch_message(target.id, target.attempt, due),
                    event_message(target.id, target.rollout_id, from, TargetState::Running, "agent started", at),
                ],
            )
            .await?;
        }
        txn.commit().await?;
        Ok(moved.is_some())
    }

    /// Fails the target from any in-flight state with `reason`; frees its
    /// slot and queues the cleanup.
    pub async fn fail_target(&self, target: &Target, reason: &str, cleanup: bool) -> Result<bool> {
        let at = self.now();
        let txn = self.begin().await?;
        let moved = apply_move(
            &txn,
            at,
            Move {
                rollout_id: target.rollout_id,
                target_id: target.id,
                attempt: Some(target.attempt),
                from: &TargetState::IN_FLIGHT,
                to: TargetState::Failed,
                detail: Some(reason.to_owned()),
                sets: vec![
                    (targets::Column::Error, Expr::value(reason)),
                    (targets::Column::FinishedAt, Expr::value(at)),
                ],
            },
        )
        .await?;
        if let Some(from) = moved {
            fail_open_patches(&txn, [target.id], reason, at).await?;
            let mut messages = vec![
                dispatch_message(target.rollout_id),
                event_message(target.id, target.rollout_id, from, TargetState::Failed, reason, at),
            ];
            if cleanup {
                messages.push(cleanup_message(target.id, target.attempt));
            }
            push_outbox(&txn, at, messages).await?;
        }
        txn.commit().await?;
        Ok(moved.is_some())
    }

    /// A transient error: back to `queued` (keeping the slot) and a new
    /// deploy job after `delay`.
    pub async fn requeue_for_retry(
        &self,
        target: &Target,
        reason: &str,
        next_try: u32,
        delay: Duration,
    ) -> Result<bool> {
        let at = self.now();
        let txn = self.begin().await?;
        let moved = apply_move(
            &txn,
            at,
            Move {
                rollout_id: target.rollout_id,
                target_id: target.id,
                attempt: Some(target.attempt),
                from: &[TargetState::Probing, TargetState::Staging, TargetState::Installing],
                to: TargetState::Queued,
                detail: Some(format!("try {next_try} in {} s: {reason}", delay.as_secs())),
                sets: vec![
                    (targets::Column::Error, Expr::value(reason)),
                    (targets::Column::Try, Expr::value(next_try as i32)),
                ],
            },
        )
        .await?;
        if moved.is_some() {
            push_outbox(
                &txn,
                at,
                vec![deploy_message(target.id, target.rollout_id, target.attempt, next_try).delayed(delay)],
            )
            .await?;
        }
        txn.commit().await?;
        Ok(moved.is_some())
    }

    /// Records the verification scan.
    pub async fn record_verification(
        &self,
        target_id: Uuid,
        attempt: u32,
        installed: &[u32],
        missing: &[u32],
    ) -> Result<()> {
        let verdict = if missing.is_empty() {
            "all_installed".to_owned()
        } else if installed.is_empty() {
            "none_installed".to_owned()
        } else {
            format!("missing {}", missing.iter().map(|i| format!("#{i}")).collect::<Vec<_>>().join(", "))
        };
        let at = self.now();
        targets::Entity::update_many()
            .col_expr(targets::Column::VerifiedState, Expr::value(verdict))
            .col_expr(targets::Column::VerifiedAt, Expr::value(at))
            .filter(targets::Column::Id.eq(target_id))
            .filter(targets::Column::Attempt.eq(attempt as i32))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    // ------------------------------------------------------------ watchdog

    /// The watchdog check: times the target out when it has not reported
    /// within its timeout, else says when to look again.
    pub async fn check_timeout(&self, target_id: Uuid, attempt: u32, policy: TimeoutPolicy) -> Result<WatchOutcome> {
        let outcomes = self.check_timeouts(&[(target_id, attempt)], policy).await?;
        Ok(outcomes.into_iter().next().unwrap_or(WatchOutcome::Gone))
    }

    /// The watchdog check for a batch of timers (target, attempt), in one
    /// transaction: the targets are locked in id order; each one still
    /// running that attempt and silent past its timeout is timed out (its
    /// open patches failed with the reason, its history appended), with one
    /// dispatch request per rollout and, per target, a delayed verification
    /// and an event. One outcome per timer, in order; a second timer for the
    /// same target in the batch finds it gone.
    pub async fn check_timeouts(&self, timers: &[(Uuid, u32)], policy: TimeoutPolicy) -> Result<Vec<WatchOutcome>> {
        if timers.is_empty() {
            return Ok(vec![]);
        }
        let txn = self.begin().await?;
        let mut ids: Vec<Uuid> = timers.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        let mut current: HashMap<Uuid, Target> = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(INSERT_CHUNK) {
            let rows = targets::Entity::find()
                .filter(targets::Column::Id.is_in(chunk.iter().copied()))
                .order_by_asc(targets::Column::Id)
                .lock(LockType::NoKeyUpdate)
                .all(&txn)
                .await?;
            for row in rows {
                let target = target_from(row)?;
                current.insert(target.id, target);
            }
        }
        let at = self.now();
        let mut expired = HashSet::new();
        let outcomes: Vec<WatchOutcome> = timers
            .iter()
            .map(|(id, attempt)| match current.get(id) {
                Some(target) if target.state == TargetState::Running && target.attempt == *attempt => {
                    let last = target.last_seen_at.into_iter().chain(target.running_at).max().unwrap_or(at);
                    let deadline = last + chrono::Duration::seconds(i64::from(target.timeout_seconds));
                    if at < deadline {
                        WatchOutcome::NotYet(deadline)
                    } else if expired.insert(*id) {
                        WatchOutcome::TimedOut
                    } else {
                        WatchOutcome::Gone
                    }
                }
                _ => WatchOutcome::Gone,
            })
            .collect();
        if expired.is_empty() {
            txn.commit().await?;
            return Ok(outcomes);
        }
        let expired: Vec<&Target> = ids.iter().filter(|id| expired.contains(id)).map(|id| &current[id]).collect();
        let reason_for =
            |timeout: u32| format!("no feedback received within {timeout} s; the deployment may have failed");
        let mut by_timeout: BTreeMap<u32, Vec<Uuid>> = BTreeMap::new();
        for target in &expired {
            by_timeout.entry(target.timeout_seconds).or_default().push(target.id);
        }
        for (timeout, ids) in by_timeout {
            let reason = reason_for(timeout);
            targets::Entity::update_many()
                .col_expr(targets::Column::State, Expr::value(TargetState::TimedOut.as_str()))
                .col_expr(targets::Column::Error, Expr::value(reason.clone()))
                .col_expr(targets::Column::FinishedAt, Expr::value(at))
                .col_expr(targets::Column::UpdatedAt, Expr::value(at))
                // Locked above and checked to be running: by primary key alone (see `queue_next`).
                .filter(targets::Column::Id.is_in(ids.clone()))
                .exec(&txn)
                .await?;
            fail_open_patches(&txn, ids, &reason, at).await?;
        }
        let history = expired.iter().map(|target| target_transitions::ActiveModel {
            rollout_id: Set(target.rollout_id),
            target_id: Set(target.id),
            from_state: Set(TargetState::Running.as_str().into()),
            to_state: Set(TargetState::TimedOut.as_str().into()),
            at: Set(at),
            detail: Set(Some(reason_for(target.timeout_seconds))),
            ..Default::default()
        });
        target_transitions::Entity::insert_many(history).exec_without_returning(&txn).await?;
        let rollouts: BTreeSet<Uuid> = expired.iter().map(|target| target.rollout_id).collect();
        let mut messages: Vec<Outgoing> = rollouts.into_iter().map(dispatch_message).collect();
        for target in &expired {
            messages.push(
                Outgoing::work(
                    routing::VERIFY,
                    v1::VerifyJob { target_id: target.id.to_string(), attempt: target.attempt, cleanup_after: true }
                        .encode_to_vec(),
                )
                .delayed(policy.verify_delay),
            );
            messages.push(event_message(
                target.id,
                target.rollout_id,
                TargetState::Running,
                TargetState::TimedOut,
                &reason_for(target.timeout_seconds),
                at,
            ));
        }
        push_outbox(&txn, at, messages).await?;
        txn.commit().await?;
        Ok(outcomes)
    }

    /// What the scheduler exports as gauges: rollouts per state, the targets
    /// of running and paused rollouts per state, and the outbox rows not yet
    /// published (the relay's backlog).
    pub async fn fleet_gauges(&self) -> Result<FleetGauges> {
        let rollouts: Vec<(String, i64)> = rollouts::Entity::find()
            .select_only()
            .column(rollouts::Column::State)
            .column_as(rollouts::Column::Id.count(), "n")
            .group_by(rollouts::Column::State)
            .into_tuple()
            .all(&self.db)
            .await?;
        let active = rollouts::Entity::find()
            .select_only()
            .column(rollouts::Column::Id)
            .filter(rollouts::Column::State.is_in([RolloutState::Running.as_str(), RolloutState::Paused.as_str()]))
            .into_query();
        let targets: Vec<(String, i64)> = targets::Entity::find()
            .select_only()
            .column(targets::Column::State)
            .column_as(targets::Column::Id.count(), "n")
            .filter(targets::Column::RolloutId.in_subquery(active))
            .group_by(targets::Column::State)
            .into_tuple()
            .all(&self.db)
            .await?;
        let outbox_pending = self.outbox_depth().await?;
        Ok(FleetGauges {
            rollouts_by_state: rollouts.into_iter().map(|(state, n)| (state, n as u64)).collect(),
            active_targets_by_state: targets.into_iter().map(|(state, n)| (state, n as u64)).collect(),
            outbox_pending,
        })
    }

    /// Publishes `messages` through the outbox (in their own transaction).
    pub async fn enqueue(&self, messages: Vec<Outgoing>) -> Result<()> {
        push_outbox(&self.db, self.now(), messages).await
    }

    // ------------------------------------------------------------ collector

    /// What the collector needs to authenticate a target's agent: the
    /// current attempt, the nonce its token was derived with, the token's
    /// hash and the target's state (a final state ends the attempt's key).
    pub async fn token_info(&self, target_id: Uuid) -> Result<Option<TokenInfo>> {
        /// token hash, token nonce, attempt, rollout, state
        type Row = (Option<String>, Option<String>, i32, Uuid, String);
        let row: Option<Row> = targets::Entity::find_by_id(target_id)
            .select_only()
            .column(targets::Column::TokenHash)
            .column(targets::Column::TokenNonce)
            .column(targets::Column::Attempt)
            .column(targets::Column::RolloutId)
            .column(targets::Column::State)
            .into_tuple()
            .one(&self.db)
            .await?;
        let Some((Some(token_hash), token_nonce, attempt, rollout_id, state)) = row else {
            return Ok(None);
        };
        let state = state.parse::<TargetState>().map_err(|e| Error::Corrupt(e.to_string()))?;
        Ok(Some(TokenInfo {
            token_hash,
            token_nonce: token_nonce.unwrap_or_default(),
            attempt: attempt as u32,
            rollout_id,
            state,
        }))
    }

    /// Whether the agent's final result of `attempt` is stored (the
    /// collector stops accepting the attempt's key after it).
    pub async fn final_reported(&self, target_id: Uuid, attempt: u32) -> Result<bool> {
        Ok(agent_events::Entity::find()
            .filter(agent_events::Column::TargetId.eq(target_id))
            .filter(agent_events::Column::Attempt.eq(attempt as i32))
            .filter(agent_events::Column::Kind.eq("final"))
            .count(&self.db)
            .await?
            > 0)
    }

    /// How many of the reports numbered `seqs` of `attempt` are stored. The
    /// collector answers a closed attempt's retry of reports it already
    /// stored (its answer was lost) as duplicates, not as late reports.
    pub async fn stored_report_count(&self, target_id: Uuid, attempt: u32, seqs: &[u64]) -> Result<u64> {
        if seqs.is_empty() {
            return Ok(0);
        }
        Ok(agent_events::Entity::find()
            .filter(agent_events::Column::TargetId.eq(target_id))
            .filter(agent_events::Column::Attempt.eq(attempt as i32))
            .filter(agent_events::Column::Seq.is_in(seqs.iter().map(|seq| i64::try_from(*seq).unwrap_or(i64::MAX))))
            .count(&self.db)
            .await?)
    }

    /// Applies a batch of authenticated reports in one transaction:
    /// idempotent by (target, attempt, seq); every new report moves the
    /// target's last-seen time (the watchdog's deadline); patch results and
    /// the final result are recorded with guarded updates.
    pub async fn apply_reports(&self, reports: &[IncomingReport]) -> Result<Vec<ReportResult>> {
        if reports.is_empty() {
            return Ok(vec![]);
        }
        let received_at = self.now();
        let mut seen_in_batch = HashSet::new();
        let unique: Vec<&IncomingReport> =
            reports.iter().filter(|r| seen_in_batch.insert((r.target_id, r.attempt, r.seq))).collect();
        let mut fresh = if self.backend() == DbBackend::Postgres {
            self.apply_reports_postgres(&unique, received_at).await?
        } else {
            self.apply_reports_portable(&unique, received_at).await?
        };
        Ok(reports
            .iter()
            .map(|r| {
                if fresh.remove(&(r.target_id, r.attempt, r.seq)) {
                    ReportResult::Accepted
                } else {
                    ReportResult::Duplicate
                }
            })
            .collect())
    }

    /// PostgreSQL: the events, the targets' last-seen times and the patch
    /// results of the whole batch in one statement whose text never changes
    /// (the reports travel as arrays), so it is parsed and planned once per
    /// connection. A batch without a final result needs no more than that
    /// statement, which is atomic on its own; one with final results runs it
    /// and the finals' statements in one transaction.
    async fn apply_reports_postgres(
        &self,
        unique: &[&IncomingReport],
        received_at: DateTime<Utc>,
    ) -> Result<HashSet<(Uuid, u32, u64)>> {
        let statement = intake_statement(unique, received_at);
        if !unique.iter().any(|r| matches!(r.kind, ReportKind::Final { .. })) {
            return fresh_keys(self.db.query_all(statement).await?);
        }
        let txn = self.begin().await?;
        let fresh = fresh_keys(txn.query_all(statement).await?)?;
        let finals: Vec<&IncomingReport> = unique
            .iter()
            .copied()
            .filter(|r| matches!(r.kind, ReportKind::Final { .. }) && fresh.contains(&(r.target_id, r.attempt, r.seq)))
            .collect();
        for chunk in finals.chunks(INSERT_CHUNK) {
            apply_final_results(&txn, chunk, received_at).await?;
        }
        txn.commit().await?;
        Ok(fresh)
    }

    /// Any backend (SQLite): a few statements per batch in one transaction.
    async fn apply_reports_portable(
        &self,
        unique: &[&IncomingReport],
        received_at: DateTime<Utc>,
    ) -> Result<HashSet<(Uuid, u32, u64)>> {
        let txn = self.begin().await?;
        let mut fresh: HashSet<(Uuid, u32, u64)> = HashSet::new();
        for chunk in unique.chunks(INSERT_CHUNK) {
            let mut insert = Query::insert();
            insert.into_table(agent_events::Entity).columns([
                agent_events::Column::TargetId,
                agent_events::Column::Attempt,
                agent_events::Column::Seq,
                agent_events::Column::Kind,
                agent_events::Column::PatchIndex,
                agent_events::Column::ExitCode,
                agent_events::Column::Detail,
                agent_events::Column::SentAt,
                agent_events::Column::ReceivedAt,
            ]);
            for report in chunk {
                let event = EventColumns::of(report);
                insert.values_panic([
                    report.target_id.into(),
                    (report.attempt as i32).into(),
                    (report.seq as i64).into(),
                    event.kind.into(),
                    event.patch_index.into(),
                    event.exit_code.into(),
                    event.detail.into(),
                    report.sent_at.into(),
                    received_at.into(),
                ]);
            }
            insert.on_conflict(
                OnConflict::columns([
                    agent_events::Column::TargetId,
                    agent_events::Column::Attempt,
                    agent_events::Column::Seq,
                ])
                .do_nothing()
                .to_owned(),
            );
            insert.returning(Query::returning().columns([
                agent_events::Column::TargetId,
                agent_events::Column::Attempt,
                agent_events::Column::Seq,
            ]));
            let statement = self.backend().build(&insert);
            fresh.extend(fresh_keys(txn.query_all(statement).await?)?);
        }
        // Every fresh report resets its target's deadline.
        let touched: Vec<Uuid> = {
            let mut ids: Vec<Uuid> = fresh.iter().map(|(id, _, _)| *id).collect();
            ids.sort();
            ids.dedup();
            ids
        };
        for chunk in touched.chunks(INSERT_CHUNK) {
            targets::Entity::update_many()
                .col_expr(targets::Column::LastSeenAt, Expr::value(received_at))
                .filter(targets::Column::Id.is_in(chunk.iter().copied()))
                .filter(targets::Column::State.is_in(state_strs(&TargetState::IN_FLIGHT)))
                .exec(&txn)
                .await?;
        }
        let accepted: Vec<&IncomingReport> =
            unique.iter().copied().filter(|r| fresh.contains(&(r.target_id, r.attempt, r.seq))).collect();
        // Patch results first, then the final results (which fail the patches
        // left open, so they come last).
        for report in &accepted {
            apply_patch_report(&txn, report, received_at).await?;
        }
        let finals: Vec<&IncomingReport> =
            accepted.iter().copied().filter(|r| matches!(r.kind, ReportKind::Final { .. })).collect();
        for chunk in finals.chunks(INSERT_CHUNK) {
            apply_final_results(&txn, chunk, received_at).await?;
        }
        txn.commit().await?;
        Ok(fresh)
    }
}

/// How a report is stored in `agent_events`.
struct EventColumns {
    kind: &'static str,
    patch_index: Option<i32>,
    exit_code: Option<i32>,
    detail: Option<String>,
}

impl EventColumns {
    fn of(report: &IncomingReport) -> Self {
        let (kind, patch_index, exit_code, detail) = match &report.kind {
            ReportKind::Started { patch_index } => ("started", Some(*patch_index as i32), None, None),
            ReportKind::Finished { patch_index, exit_code, outcome, .. } => {
                ("finished", Some(*patch_index as i32), Some(*exit_code), Some(outcome.as_str().to_owned()))
            }
            ReportKind::Heartbeat { patch_index } => ("heartbeat", patch_index.map(|i| i as i32), None, None),
            ReportKind::Final { success, message, .. } => {
                ("final", None, None, Some(format!("{}: {message}", if *success { "success" } else { "failure" })))
            }
        };
        Self { kind, patch_index, exit_code, detail }
    }
}

/// The (target, attempt, seq) of the events an insert's `RETURNING` names:
/// the fresh reports of a batch.
fn fresh_keys(rows: Vec<sea_orm::QueryResult>) -> Result<HashSet<(Uuid, u32, u64)>> {
    let mut fresh = HashSet::with_capacity(rows.len());
    for row in rows {
        let target_id: Uuid = row.try_get("", "target_id")?;
        let attempt: i32 = row.try_get("", "attempt")?;
        let seq: i64 = row.try_get("", "seq")?;
        fresh.insert((target_id, attempt as u32, seq as u64));
    }
    Ok(fresh)
}

/// What a batch's reports do to one patch of one attempt: whether it was
/// started, and its first result (exit code, outcome, output tail).
struct PatchEffect<'a> {
    key: (Uuid, u32, u32),
    started: bool,
    finished: Option<(i32, PatchOutcomeKind, &'a str)>,
}

/// The batch's `started` and `finished` reports, merged per (target,
/// attempt, patch) in the order they first appear.
fn patch_effects<'a>(unique: &[&'a IncomingReport]) -> Vec<PatchEffect<'a>> {
    let mut effects: Vec<PatchEffect> = Vec::new();
    let mut effect_at: HashMap<(Uuid, u32, u32), usize> = HashMap::new();
    for report in unique {
        let (patch_index, finished) = match &report.kind {
            ReportKind::Started { patch_index } => (*patch_index, None),
            ReportKind::Finished { patch_index, exit_code, outcome, output_tail } => {
                (*patch_index, Some((*exit_code, *outcome, output_tail.as_str())))
            }
            ReportKind::Heartbeat { .. } | ReportKind::Final { .. } => continue,
        };
        let key = (report.target_id, report.attempt, patch_index);
        let at = *effect_at.entry(key).or_insert_with(|| {
            effects.push(PatchEffect { key, started: false, finished: None });
            effects.len() - 1
        });
        let effect = &mut effects[at];
        match finished {
            None => effect.started = true,
            Some(result) => {
                effect.finished.get_or_insert(result);
            }
        }
    }
    effects
}

/// A PostgreSQL array parameter (arrays hold no NULLs here: optional
/// columns travel with a `has_…` array beside them).
fn pg_array<T: Into<sea_orm::Value>>(
    kind: sea_orm::sea_query::ArrayType,
    items: impl IntoIterator<Item = T>,
) -> sea_orm::Value {
    sea_orm::Value::Array(kind, Some(Box::new(items.into_iter().map(Into::into).collect())))
}

/// The text of [`intake_statement`], built once.
static INTAKE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let in_flight = in_flight_sql();
    let finishes = format!("(e.finished AND tp.state IN ('pending', 'running') AND t.state IN ({in_flight}))");
    let starts = "(e.started AND tp.state = 'pending')";
    format!(
        "WITH incoming AS ( \
             SELECT * FROM unnest($2::uuid[], $3::int[], $4::bigint[], $5::text[], $6::bool[], $7::int[], \
                                  $8::bool[], $9::int[], $10::bool[], $11::text[], $12::bool[], $13::timestamptz[]) \
             AS i(target_id, attempt, seq, kind, has_patch, patch_index, has_exit, exit_code, \
                  has_detail, detail, has_sent, sent_at) \
         ), fresh AS ( \
             INSERT INTO agent_events (target_id, attempt, seq, kind, patch_index, exit_code, detail, sent_at, received_at) \
             SELECT target_id, attempt, seq, kind, CASE WHEN has_patch THEN patch_index END, \
                    CASE WHEN has_exit THEN exit_code END, CASE WHEN has_detail THEN detail END, \
                    CASE WHEN has_sent THEN sent_at END, $1 \
             FROM incoming \
             ON CONFLICT (target_id, attempt, seq) DO NOTHING \
             RETURNING target_id, attempt, seq \
         ), touched AS ( \
             UPDATE targets SET last_seen_at = $1 \
             WHERE id IN (SELECT target_id FROM fresh) AND state IN ({in_flight}) \
         ), effects AS ( \
             SELECT * FROM unnest($14::uuid[], $15::int[], $16::int[], $17::bool[], $18::bool[], $19::text[], \
                                  $20::int[], $21::text[], $22::bool[], $23::text[]) \
             AS e(target_id, attempt, patch_index, started, finished, state, exit_code, outcome, reboot, tail) \
         ), patched AS ( \
             UPDATE target_patches AS tp SET \
                 state = CASE WHEN {finishes} THEN e.state ELSE 'running' END, \
                 started_at = CASE WHEN {starts} THEN $1 ELSE tp.started_at END, \
                 exit_code = CASE WHEN {finishes} THEN e.exit_code ELSE tp.exit_code END, \
                 outcome = CASE WHEN {finishes} THEN e.outcome ELSE tp.outcome END, \
                 reboot_required = CASE WHEN {finishes} THEN e.reboot ELSE tp.reboot_required END, \
                 output_tail = CASE WHEN {finishes} THEN e.tail ELSE tp.output_tail END, \
                 finished_at = CASE WHEN {finishes} THEN $1 ELSE tp.finished_at END \
             FROM effects AS e JOIN targets AS t ON t.id = e.target_id AND t.attempt = e.attempt \
             WHERE tp.target_id = e.target_id AND tp.patch_index = e.patch_index AND ({finishes} OR {starts}) \
         ) \
         SELECT target_id, attempt, seq FROM fresh"
    )
});

/// The one statement of [`Store::apply_reports`] on PostgreSQL: inserts the
/// events (idempotent by (target, attempt, seq)) and returns the fresh ones,
/// moves the last-seen time of the targets that sent one, and applies the
/// batch's `started` and `finished` reports to their patches.
///
/// The patch results are merged per (target, attempt, patch) first: two
/// updates of one row in one statement would leave only one of them. The
/// merged update does what the two in sequence did: `started` moves a
/// pending patch to running (reporting attempt only); `finished` (the first
/// in the batch) records the result of a pending or running patch while its
/// target is in flight in the reporting attempt. Reports that turn out to be
/// duplicates change nothing through it: every guard is on the patch's
/// current state, which they already moved.
fn intake_statement(unique: &[&IncomingReport], received_at: DateTime<Utc>) -> sea_orm::Statement {
    use sea_orm::sea_query::ArrayType;
    let events: Vec<EventColumns> = unique.iter().map(|r| EventColumns::of(r)).collect();
    let effects = patch_effects(unique);
    let results = || effects.iter().map(|e| e.finished);
    let patch_state = |outcome: PatchOutcomeKind| {
        if outcome.succeeded() { PatchState::Succeeded } else { PatchState::Failed }.as_str()
    };
    let values = vec![
        received_at.into(),
        pg_array(ArrayType::Uuid, unique.iter().map(|r| r.target_id)),
        pg_array(ArrayType::Int, unique.iter().map(|r| r.attempt as i32)),
        pg_array(ArrayType::BigInt, unique.iter().map(|r| r.seq as i64)),
        pg_array(ArrayType::String, events.iter().map(|e| e.kind)),
        pg_array(ArrayType::Bool, events.iter().map(|e| e.patch_index.is_some())),
        pg_array(ArrayType::Int, events.iter().map(|e| e.patch_index.unwrap_or(0))),
        pg_array(ArrayType::Bool, events.iter().map(|e| e.exit_code.is_some())),
        pg_array(ArrayType::Int, events.iter().map(|e| e.exit_code.unwrap_or(0))),
        pg_array(ArrayType::Bool, events.iter().map(|e| e.detail.is_some())),
        pg_array(ArrayType::String, events.iter().map(|e| e.detail.clone().unwrap_or_default())),
        pg_array(ArrayType::Bool, unique.iter().map(|r| r.sent_at.is_some())),
        pg_array(ArrayType::ChronoDateTimeUtc, unique.iter().map(|r| r.sent_at.unwrap_or(received_at))),
        pg_array(ArrayType::Uuid, effects.iter().map(|e| e.key.0)),
        pg_array(ArrayType::Int, effects.iter().map(|e| e.key.1 as i32)),
        pg_array(ArrayType::Int, effects.iter().map(|e| e.key.2 as i32)),
        pg_array(ArrayType::Bool, effects.iter().map(|e| e.started)),
        pg_array(ArrayType::Bool, results().map(|r| r.is_some())),
        pg_array(ArrayType::String, results().map(|r| r.map_or("", |(_, outcome, _)| patch_state(outcome)))),
        pg_array(ArrayType::Int, results().map(|r| r.map_or(0, |(exit_code, _, _)| exit_code))),
        pg_array(ArrayType::String, results().map(|r| r.map_or("", |(_, outcome, _)| outcome.as_str()))),
        pg_array(
            ArrayType::Bool,
            results().map(|r| r.is_some_and(|(_, outcome, _)| outcome == PatchOutcomeKind::InstalledRebootRequired)),
        ),
        pg_array(ArrayType::String, results().map(|r| r.map_or("", |(_, _, tail)| tail))),
    ];
    sea_orm::Statement::from_sql_and_values(DbBackend::Postgres, INTAKE_SQL.as_str(), values)
}

/// A `started` or `finished` report, one statement (SQLite; PostgreSQL
/// merges them into the batch's one statement, see [`intake_statement`]).
async fn apply_patch_report(txn: &DatabaseTransaction, report: &IncomingReport, at: DateTime<Utc>) -> Result<()> {
    let this_attempt = |in_flight: bool| {
        let mut query = Query::select()
            .expr(Expr::value(1))
            .from(targets::Entity)
            .and_where(Expr::col((targets::Entity, targets::Column::Id)).eq(report.target_id))
            .and_where(Expr::col((targets::Entity, targets::Column::Attempt)).eq(report.attempt as i32))
            .to_owned();
        if in_flight {
            query.and_where(
                Expr::col((targets::Entity, targets::Column::State)).is_in(state_strs(&TargetState::IN_FLIGHT)),
            );
        }
        Expr::exists(query)
    };
    match &report.kind {
        ReportKind::Started { patch_index } => {
            target_patches::Entity::update_many()
                .col_expr(target_patches::Column::State, Expr::value(PatchState::Running.as_str()))
                .col_expr(target_patches::Column::StartedAt, Expr::value(at))
                .filter(target_patches::Column::TargetId.eq(report.target_id))
                .filter(target_patches::Column::PatchIndex.eq(*patch_index as i32))
                .filter(target_patches::Column::State.eq(PatchState::Pending.as_str()))
                .filter(this_attempt(false))
                .exec(txn)
                .await?;
        }
        ReportKind::Finished { patch_index, exit_code, outcome, output_tail } => {
            let state = if outcome.succeeded() { PatchState::Succeeded } else { PatchState::Failed };
            target_patches::Entity::update_many()
                .col_expr(target_patches::Column::State, Expr::value(state.as_str()))
                .col_expr(target_patches::Column::ExitCode, Expr::value(*exit_code))
                .col_expr(target_patches::Column::Outcome, Expr::value(outcome.as_str()))
                .col_expr(
                    target_patches::Column::RebootRequired,
                    Expr::value(*outcome == PatchOutcomeKind::InstalledRebootRequired),
                )
                .col_expr(target_patches::Column::OutputTail, Expr::value(output_tail.clone()))
                .col_expr(target_patches::Column::FinishedAt, Expr::value(at))
                .filter(target_patches::Column::TargetId.eq(report.target_id))
                .filter(target_patches::Column::PatchIndex.eq(*patch_index as i32))
                .filter(
                    target_patches::Column::State.is_in([PatchState::Pending.as_str(), PatchState::Running.as_str()]),
                )
                .filter(this_attempt(true))
                .exec(txn)
                .await?;
        }
        ReportKind::Heartbeat { .. } | ReportKind::Final { .. } => {}
    }
    Ok(())
}

/// The final results of a batch, a few statements for all of them: the
/// targets are locked in id order, those still in flight in the reporting
/// attempt move to succeeded or failed (the first final result per target
/// counts), with their history, their open patches failed, and one dispatch
/// request per rollout plus a cleanup job and an event per target.
async fn apply_final_results(txn: &DatabaseTransaction, finals: &[&IncomingReport], at: DateTime<Utc>) -> Result<()> {
    let mut ids: Vec<Uuid> = finals.iter().map(|r| r.target_id).collect();
    ids.sort();
    ids.dedup();
    let rows: Vec<(Uuid, Uuid, String, i32)> = targets::Entity::find()
        .select_only()
        .column(targets::Column::Id)
        .column(targets::Column::RolloutId)
        .column(targets::Column::State)
        .column(targets::Column::Attempt)
        .filter(targets::Column::Id.is_in(ids))
        .order_by_asc(targets::Column::Id)
        .lock(LockType::NoKeyUpdate)
        .into_tuple()
        .all(txn)
        .await?;
    let mut current: HashMap<Uuid, (Uuid, TargetState, u32)> = HashMap::with_capacity(rows.len());
    for (id, rollout_id, state, attempt) in rows {
        current.insert(id, (rollout_id, parse(&state, "target state")?, attempt as u32));
    }
    const FROM: [TargetState; 4] =
        [TargetState::Probing, TargetState::Staging, TargetState::Installing, TargetState::Running];
    // (target, rollout, from, to, detail)
    let mut moves: Vec<(Uuid, Uuid, TargetState, TargetState, String)> = Vec::new();
    let mut moved = HashSet::new();
    for report in finals {
        let ReportKind::Final { success, message, .. } = &report.kind else { continue };
        let Some((rollout_id, state, attempt)) = current.get(&report.target_id) else { continue };
        if *attempt != report.attempt || !FROM.contains(state) || !moved.insert(report.target_id) {
            continue;
        }
        let to = if *success { TargetState::Succeeded } else { TargetState::Failed };
        moves.push((report.target_id, *rollout_id, *state, to, format!("agent: {message}")));
    }
    if moves.is_empty() {
        return Ok(());
    }
    // One UPDATE per outcome (and per failure message, usually one or two).
    let mut groups: BTreeMap<(&'static str, Option<&str>), Vec<Uuid>> = BTreeMap::new();
    for (target_id, _, _, to, detail) in &moves {
        let error = (*to == TargetState::Failed).then_some(detail.as_str());
        groups.entry((to.as_str(), error)).or_default().push(*target_id);
    }
    for ((to, error), ids) in groups {
        let mut update = targets::Entity::update_many()
            .col_expr(targets::Column::State, Expr::value(to))
            .col_expr(targets::Column::FinishedAt, Expr::value(at))
            .col_expr(targets::Column::UpdatedAt, Expr::value(at));
        if let Some(error) = error {
            update = update.col_expr(targets::Column::Error, Expr::value(error));
        }
        // Locked above and checked against FROM: by primary key alone (see `queue_next`).
        update.filter(targets::Column::Id.is_in(ids)).exec(txn).await?;
    }
    let history = moves.iter().map(|(target_id, rollout_id, from, to, detail)| target_transitions::ActiveModel {
        rollout_id: Set(*rollout_id),
        target_id: Set(*target_id),
        from_state: Set(from.as_str().into()),
        to_state: Set(to.as_str().into()),
        at: Set(at),
        detail: Set(Some(detail.clone())),
        ..Default::default()
    });
    target_transitions::Entity::insert_many(history).exec_without_returning(txn).await?;
    fail_open_patches(txn, moves.iter().map(|m| m.0), "the agent finished without reporting this patch", at).await?;
    let rollouts: BTreeSet<Uuid> = moves.iter().map(|m| m.1).collect();
    let mut messages: Vec<Outgoing> = rollouts.into_iter().map(dispatch_message).collect();
    for (target_id, rollout_id, from, to, detail) in &moves {
        let attempt = current.get(target_id).map(|c| c.2).unwrap_or_default();
        messages.push(cleanup_message(*target_id, attempt));
        messages.push(event_message(*target_id, *rollout_id, *from, *to, detail, at));
    }
    push_outbox(txn, at, messages).await
}

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
