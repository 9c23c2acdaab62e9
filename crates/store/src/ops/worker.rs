//! The worker's steps: claim, probe, stage, install, running, fail, retry.

use super::*;

impl Store {
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

    /// `staging → installing`, recording how the installers were delivered
    /// (see [`Target::delivery`]). False when the target moved on.
    pub async fn mark_installing(&self, target: &Target, delivery: &str) -> Result<bool> {
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
                sets: vec![(targets::Column::Delivery, Expr::value(delivery.to_owned()))],
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
        unknown: &[u32],
    ) -> Result<()> {
        let verdict = super::reboot::verdict(installed, missing, unknown);
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
}
