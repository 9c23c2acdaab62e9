//! Offline targets: PDQ's "retry when the machine comes back online".
//!
//! With `retry_offline_for` set on the rollout, a target that could not be
//! reached after `max_tries` does not fail. It moves to `offline`, gives its
//! concurrency slot back, and a cheap reachability check (a connect, no
//! login) runs at growing intervals through the bus's wait queues. When the
//! machine answers, the target goes back to `pending`: dispatch takes it
//! again, within its maintenance window and its rollout's concurrency, even
//! when its wave has ended meanwhile. When `offline_until` passes first, it
//! becomes `failed` and only then counts against its wave's failure
//! threshold; a wave that already ended and is now over its threshold
//! pauses the rollout.
//!
//! A wave does not wait for its offline targets, but a rollout completes
//! only when none is left offline.
//!
//! The checks are numbered per offline spell (`targets.try` holds the last
//! one done), so a duplicated check message is recognised and dropped. A
//! lost one is sent again by the reconciler ([`Store::overdue_reachability_checks`]).

use super::*;

/// What a reachability check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reachability {
    /// The machine's port answered.
    Answered,
    /// It did not answer; why.
    Silent(String),
}

/// What the store made of a reachability check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The target is no longer offline in this attempt, or the check was
    /// done already (a duplicate message): nothing changed.
    Stale,
    /// Back to `pending`: dispatch takes it within its window.
    BackOnline,
    /// Still offline; check `check` is due at `next_check_at`.
    StillOffline { check: u32, next_check_at: DateTime<Utc> },
    /// `retry_offline_for` ran out: `failed`, and counted against its wave.
    GaveUp,
}

/// The bus message of reachability check `check` of a target's attempt.
pub(crate) fn reach_message(target_id: Uuid, attempt: u32, check: u32) -> Outgoing {
    Outgoing::work(
        routing::REACH,
        v1::ReachabilityCheck { target_id: target_id.to_string(), attempt, check }.encode_to_vec(),
    )
}

impl Store {
    /// The target could not be reached after every try: `offline` until the
    /// rollout's `retry_offline_for` runs out, its slot freed, the first
    /// reachability check due after `first_check`. Returns false when the
    /// target had moved on (nothing written). A rollout without
    /// `retry_offline_for` is refused ([`Error::Invalid`]).
    pub async fn go_offline(&self, target: &Target, reason: &str, first_check: Duration) -> Result<bool> {
        let at = self.now();
        let txn = self.begin().await?;
        let rollout = rollouts::Entity::find_by_id(target.rollout_id)
            .one(&txn)
            .await?
            .ok_or_else(|| Error::NotFound { what: "rollout", id: target.rollout_id.to_string() })?;
        let rollout = rollout_from(rollout)?;
        let Some(seconds) = rollout.settings.retry_offline_for_seconds else {
            return Err(Error::Invalid(format!(
                "rollout {} does not set retry_offline_for: its unreachable targets fail",
                rollout.id
            )));
        };
        let until = at + chrono::Duration::seconds(seconds.min(i64::MAX as u64 / 1_000) as i64);
        let next_check = (at + chrono::Duration::from_std(first_check).unwrap_or_default()).min(until);
        let moved = apply_move(
            &txn,
            at,
            Move {
                rollout_id: target.rollout_id,
                target_id: target.id,
                attempt: Some(target.attempt),
                from: &[TargetState::Probing, TargetState::Staging, TargetState::Installing],
                to: TargetState::Offline,
                detail: Some(format!("offline until {}: {reason}", until.to_rfc3339())),
                sets: vec![
                    (targets::Column::Error, Expr::value(reason)),
                    (targets::Column::Try, Expr::value(0)),
                    (targets::Column::OfflineUntil, Expr::value(until)),
                    (targets::Column::NextCheckAt, Expr::value(next_check)),
                ],
            },
        )
        .await?;
        if let Some(from) = moved {
            let delay = (next_check - at).to_std().unwrap_or_default();
            push_outbox(
                &txn,
                at,
                vec![
                    dispatch_message(target.rollout_id),
                    event_message(target.id, target.rollout_id, from, TargetState::Offline, reason, at),
                    reach_message(target.id, target.attempt, 1).delayed(delay),
                ],
            )
            .await?;
        }
        txn.commit().await?;
        Ok(moved.is_some())
    }

    /// Applies reachability check `check` of an offline target's `attempt`:
    /// back to `pending` when it answered; when it did not, the next check
    /// after `next_delay` (never later than `offline_until`), or `failed`
    /// once `offline_until` has passed.
    pub async fn record_reachability(
        &self,
        target_id: Uuid,
        attempt: u32,
        check: u32,
        found: &Reachability,
        next_delay: Duration,
    ) -> Result<CheckOutcome> {
        let at = self.now();
        let txn = self.begin().await?;
        let Some(target) = due_check(&txn, target_id, TargetState::Offline, attempt, check).await? else {
            return Ok(CheckOutcome::Stale);
        };
        let outcome = match found {
            Reachability::Answered => {
                self.back_online(&txn, &target, check, at).await?;
                CheckOutcome::BackOnline
            }
            Reachability::Silent(reason) => match target.offline_until {
                Some(until) if at < until => {
                    let sets = vec![(targets::Column::Error, Expr::value(reason.as_str()))];
                    let next_check_at = next_check(&txn, &target, check, at, next_delay, until, sets).await?;
                    CheckOutcome::StillOffline { check: check + 1, next_check_at }
                }
                _ => {
                    self.give_up_offline(&txn, &target, check, reason, at).await?;
                    CheckOutcome::GaveUp
                }
            },
        };
        txn.commit().await?;
        Ok(outcome)
    }

    async fn back_online(
        &self,
        txn: &DatabaseTransaction,
        target: &Target,
        check: u32,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let detail = format!("answered reachability check {check}; waits for a slot and its window");
        let moved = leave_offline(txn, at, target, TargetState::Pending, detail, offline_cleared()).await?;
        if moved.is_some() {
            push_outbox(txn, at, vec![dispatch_message(target.rollout_id)]).await?;
        }
        Ok(())
    }

    async fn give_up_offline(
        &self,
        txn: &DatabaseTransaction,
        target: &Target,
        check: u32,
        last: &str,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let rollout = rollouts::Entity::find_by_id(target.rollout_id)
            .lock(LockType::NoKeyUpdate)
            .one(txn)
            .await?
            .ok_or_else(|| Error::NotFound { what: "rollout", id: target.rollout_id.to_string() })?;
        let rollout = rollout_from(rollout)?;
        let span = span(rollout.settings.retry_offline_for_seconds.unwrap_or_default());
        let reason = format!(
            "offline: did not answer {check} reachability check{} within retry_offline_for ({span}); last: {last}",
            if check == 1 { "" } else { "s" }
        );
        let mut sets = offline_cleared();
        sets.push((targets::Column::Error, Expr::value(reason.as_str())));
        sets.push((targets::Column::FinishedAt, Expr::value(at)));
        let moved = leave_offline(txn, at, target, TargetState::Failed, reason.clone(), sets).await?;
        let Some(from) = moved else { return Ok(()) };
        fail_open_patches(txn, [target.id], &reason, at).await?;
        push_outbox(
            txn,
            at,
            vec![
                dispatch_message(target.rollout_id),
                event_message(target.id, target.rollout_id, from, TargetState::Failed, &reason, at),
            ],
        )
        .await?;
        // A wave that is still open counts this failure when it ends; one
        // that ended before counts it now.
        let open = [RolloutState::Running, RolloutState::WaitingForWindow, RolloutState::AwaitingApproval];
        if target.wave >= rollout.current_wave || !open.contains(&rollout.state) {
            return Ok(());
        }
        let ended = wave_failures(txn, &rollout, target.wave).await?;
        if !ended.over_threshold() {
            return Ok(());
        }
        let WaveFailures { failures, total, threshold } = ended;
        let failed_percent = ended.percent();
        let name = rollout.waves.get(target.wave as usize).map(|w| w.name.as_str()).unwrap_or("default");
        let pause = format!(
            "wave {name:?} now has {failures} of {total} targets failed or timed out ({failed_percent:.1}%), above its \
             threshold of {threshold}%, after its offline target {} did not come back; resume to go on",
            target.host
        );
        rollouts::Entity::update_many()
            .col_expr(rollouts::Column::State, Expr::value(RolloutState::Paused.as_str()))
            .col_expr(rollouts::Column::PauseReason, Expr::value(pause))
            .col_expr(rollouts::Column::NextWindowAt, Expr::value(Option::<DateTime<Utc>>::None))
            .col_expr(rollouts::Column::UpdatedAt, Expr::value(at))
            .filter(rollouts::Column::Id.eq(rollout.id))
            .exec(txn)
            .await?;
        Ok(())
    }

    /// Reachability checks to send again: offline and rebooting targets
    /// whose next check was due more than `grace` ago (its message was lost), oldest first,
    /// at most `limit`. A duplicate of a check that was only late is dropped
    /// by its number.
    pub async fn overdue_reachability_checks(&self, grace: Duration, limit: u64) -> Result<Vec<Outgoing>> {
        let cutoff = self.now() - chrono::Duration::from_std(grace).unwrap_or_default();
        let rows: Vec<(Uuid, i32, i32)> = targets::Entity::find()
            .select_only()
            .column(targets::Column::Id)
            .column(targets::Column::Attempt)
            .column(targets::Column::Try)
            .filter(targets::Column::State.is_in(state_strs(&[TargetState::Offline, TargetState::Rebooting])))
            .filter(targets::Column::NextCheckAt.lt(cutoff))
            .order_by_asc(targets::Column::NextCheckAt)
            .order_by_asc(targets::Column::Id)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows.into_iter().map(|(id, attempt, done)| reach_message(id, attempt as u32, done as u32 + 1)).collect())
    }
}

/// The target of check `check` of its `attempt` while it is `state`,
/// locked; `None` when it is not (it moved on, another attempt, or the
/// check was done already: a duplicate message). Checks are numbered per
/// spell in `targets.try`.
pub(super) async fn due_check(
    txn: &DatabaseTransaction,
    target_id: Uuid,
    state: TargetState,
    attempt: u32,
    check: u32,
) -> Result<Option<Target>> {
    let Some(row) = targets::Entity::find_by_id(target_id).lock(LockType::NoKeyUpdate).one(txn).await? else {
        return Err(Error::NotFound { what: "target", id: target_id.to_string() });
    };
    let target = target_from(row)?;
    Ok((target.state == state && target.attempt == attempt && check == target.tries + 1).then_some(target))
}

/// Check `check` of `target` is done and found it still away: the next one
/// is due after `delay`, never later than `until`, with the columns `sets`
/// (why it is away); its message is queued, delayed. Returns when it is due.
pub(super) async fn next_check(
    txn: &DatabaseTransaction,
    target: &Target,
    check: u32,
    at: DateTime<Utc>,
    delay: Duration,
    until: DateTime<Utc>,
    sets: Vec<(targets::Column, SimpleExpr)>,
) -> Result<DateTime<Utc>> {
    let next_check_at = (at + chrono::Duration::from_std(delay).unwrap_or_default()).min(until);
    let mut update = targets::Entity::update_many()
        .col_expr(targets::Column::Try, Expr::value(check as i32))
        .col_expr(targets::Column::NextCheckAt, Expr::value(next_check_at))
        .col_expr(targets::Column::UpdatedAt, Expr::value(at));
    for (column, value) in sets {
        update = update.col_expr(column, value);
    }
    update.filter(targets::Column::Id.eq(target.id)).exec(txn).await?;
    let wait = (next_check_at - at).to_std().unwrap_or_default();
    push_outbox(txn, at, vec![reach_message(target.id, target.attempt, check + 1).delayed(wait)]).await?;
    Ok(next_check_at)
}

/// The end of an offline spell (this attempt's, guarded): to `pending` or `failed`.
async fn leave_offline(
    txn: &DatabaseTransaction,
    at: DateTime<Utc>,
    target: &Target,
    to: TargetState,
    detail: String,
    sets: Vec<(targets::Column, SimpleExpr)>,
) -> Result<Option<TargetState>> {
    let mv = Move {
        rollout_id: target.rollout_id,
        target_id: target.id,
        attempt: Some(target.attempt),
        from: &[TargetState::Offline],
        to,
        detail: Some(detail),
        sets,
    };
    apply_move(txn, at, mv).await
}

/// The columns an offline spell sets, cleared when it ends.
fn offline_cleared() -> Vec<(targets::Column, SimpleExpr)> {
    vec![
        (targets::Column::Try, Expr::value(0)),
        (targets::Column::OfflineUntil, Expr::value(Option::<DateTime<Utc>>::None)),
        (targets::Column::NextCheckAt, Expr::value(Option::<DateTime<Utc>>::None)),
    ]
}

/// A duration for people: `45 s`, `90 min`, `24 h`, `3 d`.
pub(super) fn span(seconds: u64) -> String {
    match seconds {
        s if s % 86_400 == 0 && s >= 86_400 => format!("{} d", s / 86_400),
        s if s % 3_600 == 0 && s >= 3_600 => format!("{} h", s / 3_600),
        s if s % 60 == 0 && s >= 60 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn spans_read_as_people_write_them() {
        assert_eq!(super::span(45), "45 s");
        assert_eq!(super::span(5_400), "90 min");
        assert_eq!(super::span(86_400), "1 d");
        assert_eq!(super::span(7_200), "2 h");
        assert_eq!(super::span(3_601), "3601 s");
    }
}
