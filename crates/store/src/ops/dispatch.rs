//! Dispatch: a rollout's free slots filled with its next pending targets, wave by wave.

use super::cursor::{first_pending, take_rewinds, Cursor};
use super::*;
use crate::schedule::{Openness, Schedule};

impl Store {
    // ------------------------------------------------------------ dispatch

    /// Fills the rollout's free slots with its next pending targets, and
    /// moves through waves. Serialized per rollout by a row lock, so no two
    /// dispatches can exceed `concurrency` together.
    pub async fn dispatch(&self, rollout_id: Uuid) -> Result<DispatchOutcome> {
        let txn = self.begin().await?;
        let row = rollouts::Entity::find_by_id(rollout_id)
            .lock(LockType::NoKeyUpdate)
            .one(&txn)
            .await?
            .ok_or_else(|| Error::NotFound { what: "rollout", id: rollout_id.to_string() })?;
        let mut cursor = take_rewinds(&txn, &row).await?;
        let rollout = rollout_from(row)?;
        let mut outcome = DispatchOutcome { dispatched: 0, state: rollout.state, halted: None };
        if !matches!(rollout.state, RolloutState::Running | RolloutState::WaitingForWindow) {
            return Ok(outcome);
        }
        outcome.state = RolloutState::Running;
        let mut wave = rollout.current_wave;
        let wave_count = rollout.waves.len().max(1) as u32;
        let mut messages = Vec::new();
        let at = self.now();
        let schedule = &rollout.settings.schedule;
        if schedule.past_deadline(at) {
            miss_pending(&txn, &rollout, at).await?;
        }
        let openness = schedule.openness(at);
        let mut next_window_at = None;
        loop {
            // The wave is open while any of its targets is pending or in
            // flight. Slots are counted only when there is something to put
            // in them: the count is the expensive part of a pass. Targets of
            // earlier waves that came back from `offline` (or were retried)
            // go first; the cursor is behind the wave only when some may be
            // there.
            let wave_start = Cursor::wave_start(wave);
            let mut returned = false;
            if cursor < wave_start {
                match first_pending(&txn, rollout_id, cursor.earlier_than(wave)).await? {
                    Some(first) => (cursor, returned) = (first, true),
                    None => cursor = wave_start,
                }
            }
            if let (false, Some(this)) = (returned, cursor.in_wave(wave)) {
                cursor = match first_pending(&txn, rollout_id, this).await? {
                    Some(first) => first,
                    None => Cursor::wave_start(wave + 1),
                };
            }
            if returned || cursor < Cursor::wave_start(wave + 1) {
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
                let open = match &openness {
                    Openness::Any => Some(None),
                    Openness::Groups(groups) if !groups.is_empty() => Some(Some(groups.as_slice())),
                    Openness::Groups(_) | Openness::Closed => None,
                };
                if let (true, Some(open)) = (free > 0, open) {
                    let mut queued = Vec::new();
                    if returned {
                        queued = queue_next(&txn, rollout_id, cursor.earlier_than(wave), free, open, at).await?;
                        if open.is_none() {
                            cursor = past(&queued, free, wave_start);
                        }
                    }
                    let left = free - queued.len() as u64;
                    if let (true, Some(this)) = (left > 0, cursor.in_wave(wave)) {
                        let more = queue_next(&txn, rollout_id, this, left, open, at).await?;
                        // Past them only when nothing pending is left behind:
                        // no target of a closed window group was skipped, and
                        // none of an earlier wave waits.
                        if open.is_none() && cursor >= wave_start {
                            cursor = past(&more, left, Cursor::wave_start(wave + 1));
                        }
                        queued.extend(more);
                    }
                    for target in &queued {
                        messages.push(deploy_message(target.id, rollout_id, target.attempt as u32, 0));
                    }
                    outcome.dispatched += queued.len() as u32;
                }
                if outcome.dispatched == 0 && in_flight == 0 && !schedule.is_unrestricted() {
                    // Nothing may go now and nothing runs: wait for the next
                    // window of the wave's pending targets (in-flight ones
                    // finish first, and their results dispatch again).
                    let groups = pending_window_groups(&txn, rollout_id, wave).await?;
                    let (next, reason) = waiting_reason(schedule, at, &groups);
                    outcome.state = RolloutState::WaitingForWindow;
                    outcome.halted = Some(reason);
                    next_window_at = Some(next);
                }
                break;
            }
            if wave_has(&txn, rollout_id, wave, in_flight_literal()).await? {
                break;
            }
            let ended = wave_failures(&txn, &rollout, wave).await?;
            let WaveFailures { failures, total, threshold } = ended;
            let failed_percent = ended.percent();
            let spec = rollout.waves.get(wave as usize);
            if wave + 1 >= wave_count {
                // Complete only when no target is left offline (waiting for
                // its machine) or in flight after coming back from there.
                if !rollout_has_unfinished(&txn, rollout_id).await? {
                    outcome.state = RolloutState::Completed;
                }
                break;
            }
            wave += 1;
            if ended.over_threshold() {
                let name = spec.map(|w| w.name.as_str()).unwrap_or("default");
                let reason = format!(
                    "wave {name:?} ended with {failures} of {total} targets failed or timed out ({failed_percent:.1}%), \
                     above its threshold of {threshold}%; resume to continue with the next wave"
                );
                outcome.state = RolloutState::Paused;
                outcome.halted = Some(reason);
                break;
            }
            if let Some(spec) = spec.filter(|spec| spec.gated()) {
                let next = rollout.waves.get(wave as usize).map(|w| w.name.as_str()).unwrap_or("next");
                let mut reason = format!(
                    "wave {:?} ended within its threshold ({failures} of {total} targets failed or timed out); wave \
                     {next:?} starts when an operator approves (fleetpatch rollout approve {rollout_id})",
                    spec.name
                );
                if let (Some(seconds), Some(percent)) = (spec.promote_after_seconds, spec.min_success_percent) {
                    reason.push_str(&format!(
                        ", or by itself {seconds} s after the wave ended if at least {percent}% of its targets \
                         succeeded"
                    ));
                }
                outcome.state = RolloutState::AwaitingApproval;
                outcome.halted = Some(reason);
                break;
            }
        }
        let mut update = rollouts::Entity::update_many()
            .col_expr(rollouts::Column::CurrentWave, Expr::value(wave as i32))
            .col_expr(rollouts::Column::State, Expr::value(outcome.state.as_str()))
            .col_expr(rollouts::Column::NextWindowAt, Expr::value(next_window_at))
            .col_expr(rollouts::Column::DispatchWave, Expr::value(cursor.wave))
            .col_expr(rollouts::Column::DispatchOrdinal, Expr::value(cursor.ordinal))
            .col_expr(rollouts::Column::UpdatedAt, Expr::value(at));
        if let Some(reason) = &outcome.halted {
            update = update.col_expr(rollouts::Column::PauseReason, Expr::value(reason.clone()));
        } else if rollout.state == RolloutState::WaitingForWindow {
            // A window opened: the waiting reason is over.
            update = update.col_expr(rollouts::Column::PauseReason, Expr::value(Option::<String>::None));
        }
        if outcome.state == RolloutState::Completed {
            update = update.col_expr(rollouts::Column::CompletedAt, Expr::value(at));
        }
        update.filter(rollouts::Column::Id.eq(rollout_id)).exec(&txn).await?;
        push_outbox(&txn, at, messages).await?;
        txn.commit().await?;
        Ok(outcome)
    }
}

/// Whether any target of the rollout is offline or in flight.
async fn rollout_has_unfinished(txn: &DatabaseTransaction, rollout_id: Uuid) -> Result<bool> {
    let offline = targets::Column::State.eq(TargetState::Offline.as_str());
    let found = targets::Entity::find()
        .select_only()
        .column(targets::Column::Id)
        .filter(targets::Column::RolloutId.eq(rollout_id))
        .filter(Condition::any().add(offline).add(in_flight_literal()))
        .limit(1)
        .into_tuple::<Uuid>()
        .one(txn)
        .await?;
    Ok(found.is_some())
}

/// Moves every pending target of the rollout to `missed_window`: its
/// deadline passed before their maintenance window let them go.
async fn miss_pending(txn: &DatabaseTransaction, rollout: &Rollout, at: DateTime<Utc>) -> Result<()> {
    let deadline = rollout.settings.schedule.deadline.map(|d| d.to_rfc3339()).unwrap_or_default();
    let detail = format!("the rollout's deadline {deadline} passed before a maintenance window let it go");
    let missed = TargetState::MissedWindow;
    transition::move_every(txn, at, rollout.id, TargetState::Pending, missed, &detail, Some(&detail)).await?;
    Ok(())
}

/// The window groups of the pending targets of a wave and of the waves
/// before it (targets back from `offline`).
async fn pending_window_groups(txn: &DatabaseTransaction, rollout_id: Uuid, wave: u32) -> Result<Vec<u32>> {
    let groups: Vec<Option<i32>> = targets::Entity::find()
        .select_only()
        .column(targets::Column::WindowGroup)
        .distinct()
        .filter(targets::Column::RolloutId.eq(rollout_id))
        .filter(targets::Column::Wave.lte(wave as i32))
        .filter(targets::Column::State.eq(TargetState::Pending.as_str()))
        .into_tuple()
        .all(txn)
        .await?;
    Ok(groups.into_iter().flatten().map(|g| g as u32).collect())
}

/// When a waiting rollout looks again, and why it waits: the next opening
/// of one of `groups`, or the deadline if it comes first (the targets miss
/// their window then).
fn waiting_reason(schedule: &Schedule, at: DateTime<Utc>, groups: &[u32]) -> (DateTime<Utc>, String) {
    let opening = schedule.next_opening(at, groups);
    let starts = schedule.start_at.filter(|start| *start > at);
    match (opening, schedule.deadline) {
        (Some(next), _) if starts == Some(next) => (next, format!("the rollout starts at {}", next.to_rfc3339())),
        (Some(next), _) => {
            (next, format!("waiting for a maintenance window: the next one opens at {}", next.to_rfc3339()))
        }
        (None, Some(deadline)) => (
            deadline,
            format!(
                "no maintenance window of the pending targets opens before the deadline {}; they will be marked \
                 missed_window then",
                deadline.to_rfc3339()
            ),
        ),
        // Cannot happen (a window opens at least weekly); look again in an hour.
        (None, None) => (at + chrono::Duration::hours(1), "waiting for a maintenance window".into()),
    }
}

/// Where the cursor goes after a scan from it queued `queued` of the
/// `limit` it asked for: past the last one, or to `end` (the end of the
/// scanned range) when the scan ran out of pending targets first.
fn past(queued: &[Queued], limit: u64, end: Cursor) -> Cursor {
    match queued.last() {
        Some(last) if queued.len() as u64 >= limit => Cursor { wave: last.wave, ordinal: last.ordinal }.next(),
        _ => end,
    }
}

/// A target [`queue_next`] moved to `queued`.
struct Queued {
    id: Uuid,
    attempt: i32,
    wave: i32,
    ordinal: i32,
}

/// Moves the next `limit` pending targets of those `range` selects
/// ([`Cursor::earlier_than`], [`Cursor::in_wave`]), by `(wave, ordinal)`, to
/// `queued`, with their history; only those of the window groups `open`
/// when it is given.
///
/// The rows are locked as they are read, so the UPDATE goes by primary key
/// alone: a state condition beside the ids lets PostgreSQL combine the
/// primary key with the `targets_state` index (a bitmap AND), which reads
/// every entry of that state, dead versions included, for a handful of rows.
async fn queue_next(
    txn: &DatabaseTransaction,
    rollout_id: Uuid,
    range: SimpleExpr,
    limit: u64,
    open: Option<&[u32]>,
    at: DateTime<Utc>,
) -> Result<Vec<Queued>> {
    let mut query = targets::Entity::find()
        .select_only()
        .column(targets::Column::Id)
        .column(targets::Column::Attempt)
        .column(targets::Column::Wave)
        .column(targets::Column::Ordinal)
        .filter(targets::Column::RolloutId.eq(rollout_id))
        .filter(targets::Column::State.eq(TargetState::Pending.as_str()))
        .filter(range);
    if let Some(groups) = open {
        query = query.filter(targets::Column::WindowGroup.is_in(groups.iter().map(|g| *g as i32)));
    }
    let next: Vec<(Uuid, i32, i32, i32)> = query
        .order_by_asc(targets::Column::Wave)
        .order_by_asc(targets::Column::Ordinal)
        .limit(limit)
        .lock(LockType::NoKeyUpdate)
        .into_tuple()
        .all(txn)
        .await?;
    let steps: Vec<transition::Step> = next
        .iter()
        .map(|(target_id, ..)| transition::Step {
            target_id: *target_id,
            rollout_id,
            from: TargetState::Pending,
            detail: None,
        })
        .collect();
    if !steps.is_empty() {
        let sets = vec![(targets::Column::QueuedAt, Expr::value(at)), (targets::Column::Try, Expr::value(0))];
        transition::move_locked(txn, at, TargetState::Queued, &steps, sets).await?;
    }
    Ok(next.into_iter().map(|(id, attempt, wave, ordinal)| Queued { id, attempt, wave, ordinal }).collect())
}
