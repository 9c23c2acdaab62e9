//! Operator actions on a rollout: pause, resume, abort, retry the failed targets.

use super::*;

impl Store {
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
            .col_expr(rollouts::Column::NextWindowAt, Expr::value(Option::<DateTime<Utc>>::None))
            .col_expr(rollouts::Column::UpdatedAt, Expr::value(at))
            .filter(rollouts::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        match to {
            RolloutState::Running => push_outbox(&txn, at, vec![dispatch_message(id)]).await?,
            RolloutState::Aborted => {
                // Targets not dispatched, and those waiting offline for their
                // machine: moved by rollout and state, a statement or two
                // whatever their number (a million pending targets were read
                // into memory and moved 1,000 at a time: 25 s and 214 MiB).
                for from in [TargetState::Pending, TargetState::Offline] {
                    transition::move_every(&txn, at, id, from, TargetState::Cancelled, "rollout aborted", None).await?;
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
        self.set_rollout_state(
            id,
            &[RolloutState::Running, RolloutState::WaitingForWindow],
            RolloutState::Paused,
            Some(reason.into()),
        )
        .await
    }

    pub async fn resume_rollout(&self, id: Uuid) -> Result<Rollout> {
        self.set_rollout_state(id, &[RolloutState::Paused], RolloutState::Running, None).await
    }

    /// Starts the next wave of a rollout waiting in `awaiting_approval`.
    pub async fn approve_rollout(&self, id: Uuid) -> Result<Rollout> {
        self.set_rollout_state(id, &[RolloutState::AwaitingApproval], RolloutState::Running, None).await
    }

    /// Approves every rollout whose ended wave promotes automatically, its
    /// soak time (`promote_after_seconds` since the wave ended) over and
    /// its success rate at least `min_success_percent`. Returns each
    /// promoted rollout with the wave's success rate; a wave below its rate
    /// keeps waiting for an operator.
    pub async fn promote_due_rollouts(&self) -> Result<Vec<(Uuid, f64)>> {
        let now = self.now();
        let waiting = rollouts::Entity::find()
            .filter(rollouts::Column::State.eq(RolloutState::AwaitingApproval.as_str()))
            .all(&self.db)
            .await?;
        let mut promoted = Vec::new();
        for model in waiting {
            let rollout = rollout_from(model)?;
            // The rollout waits before `current_wave`: the wave that ended is the one before.
            let Some(ended) = rollout.current_wave.checked_sub(1) else { continue };
            let Some(spec) = rollout.waves.get(ended as usize) else { continue };
            let (Some(soak), Some(min_percent)) = (spec.promote_after_seconds, spec.min_success_percent) else {
                continue;
            };
            // (The API allows 30 days; a larger stored value must not overflow.)
            if now < rollout.updated_at + chrono::Duration::seconds(soak.min(100 * 365 * 86_400) as i64) {
                continue;
            }
            let in_wave = || {
                targets::Entity::find()
                    .filter(targets::Column::RolloutId.eq(rollout.id))
                    .filter(targets::Column::Wave.eq(ended as i32))
            };
            let total = in_wave().count(&self.db).await?;
            let succeeded = in_wave()
                .filter(targets::Column::State.is_in(state_strs(&[TargetState::Succeeded])))
                .count(&self.db)
                .await?;
            let percent = if total == 0 { 100.0 } else { succeeded as f64 * 100.0 / total as f64 };
            if percent < min_percent {
                continue;
            }
            match self.approve_rollout(rollout.id).await {
                Ok(_) => promoted.push((rollout.id, percent)),
                // Approved, aborted or promoted elsewhere meanwhile.
                Err(Error::Conflict(_)) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(promoted)
    }

    pub async fn abort_rollout(&self, id: Uuid) -> Result<Rollout> {
        self.set_rollout_state(
            id,
            &[
                RolloutState::Running,
                RolloutState::Paused,
                RolloutState::AwaitingApproval,
                RolloutState::WaitingForWindow,
            ],
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
            .filter(targets::Column::State.is_in(failed))
            .lock(LockType::NoKeyUpdate)
            .into_tuple()
            .all(&txn)
            .await?;
        let Some(first_wave) = retried.iter().map(|(_, _, wave)| *wave).min() else {
            return Ok(0);
        };
        let at = self.now();
        let mut steps = Vec::with_capacity(retried.len());
        for (target_id, state, _) in &retried {
            steps.push(transition::Step {
                target_id: *target_id,
                rollout_id: id,
                from: parse(state, "target state")?,
                detail: Some("retry failed".into()),
            });
        }
        let none_at = || Expr::value(Option::<DateTime<Utc>>::None);
        let sets = vec![
            (targets::Column::Attempt, Expr::col(targets::Column::Attempt).add(1)),
            (targets::Column::Try, Expr::value(0)),
            (targets::Column::TokenHash, Expr::value(Option::<String>::None)),
            (targets::Column::TokenNonce, Expr::value(Option::<String>::None)),
            (targets::Column::Error, Expr::value(Option::<String>::None)),
            (targets::Column::LastSeenAt, none_at()),
            (targets::Column::QueuedAt, none_at()),
            (targets::Column::RunningAt, none_at()),
            (targets::Column::FinishedAt, none_at()),
        ];
        transition::move_locked(&txn, at, TargetState::Pending, &steps, sets).await?;
        for chunk in retried.chunks(INSERT_CHUNK) {
            target_patches::Entity::delete_many()
                .filter(target_patches::Column::TargetId.is_in(chunk.iter().map(|(target_id, _, _)| *target_id)))
                .exec(&txn)
                .await?;
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
}
