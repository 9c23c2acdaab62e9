//! Reboot, wait for the machine to come back, verify.
//!
//! When an agent reports success and its rollout's reboot policy asks for a
//! reboot (`always`, or `if_required` and a patch said so), the agent
//! requests the reboot after its final report, and the target moves to
//! `rebooting` instead of `succeeded`. It keeps its concurrency slot: its
//! wave is not over until the machine is back and verified.
//!
//! The worker then checks the machine through the `reach` queue (the same
//! messages as an offline target's reachability checks, numbered per
//! spell in `targets.try`, so a duplicate is dropped and the reconciler
//! sends a lost one again). A check finds the machine:
//! * down (its port does not answer, or the login fails): not back yet,
//!   and `went_down_at` records when it was first seen down;
//! * up on the same boot (the boot the probe read before is
//!   unchanged; a transport that cannot read one counts the machine as
//!   rebooted once it was seen down and answers again): the reboot has not
//!   happened yet (`shutdown -r +1` waits a minute);
//! * back on a new boot: the worker runs the verification scan, and the
//!   scan is the target's verdict: `succeeded` when every patch is
//!   installed, `failed` naming the missing ones otherwise.
//!
//! A machine that is not back when `reboot_until` (the rollout's
//! `reboot_timeout_seconds` after the final report) has passed is
//! `failed: did not come back after reboot`.

use super::*;

/// What one check of a rebooting machine found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootCheck {
    /// Its port did not answer, or the login failed: not back yet (why).
    Down(String),
    /// It answers on the boot it had before: it has not rebooted yet.
    SameBoot,
    /// It is back on a new boot, and the verification scan found these
    /// patches (indexes) installed and missing; it could not judge `unknown`
    /// (no detection rule), which do not fail the target.
    Back { installed: Vec<u32>, missing: Vec<u32>, unknown: Vec<u32> },
}

/// What the store made of a check of a rebooting target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootOutcome {
    /// The target is no longer rebooting in this attempt, or the check was
    /// done already (a duplicate message): nothing changed.
    Stale,
    /// Not back yet; check `check` is due at `next_check_at`.
    Waiting { check: u32, next_check_at: DateTime<Utc> },
    /// Back, and the scan found every patch: `succeeded`.
    Verified,
    /// Back, but the scan found patches missing: `failed`.
    MissingAfterReboot,
    /// Not back within `reboot_timeout`: `failed`.
    DidNotComeBack,
}

/// The columns a target's move to `rebooting` sets: the deadline, the
/// first check due now, no down time seen yet.
pub(super) fn rebooting(at: DateTime<Utc>, timeout_seconds: u64) -> Vec<(targets::Column, SimpleExpr)> {
    let until = at + chrono::Duration::seconds(timeout_seconds.min(i64::MAX as u64 / 1_000) as i64);
    vec![
        (targets::Column::Try, Expr::value(0)),
        (targets::Column::RebootUntil, Expr::value(until)),
        (targets::Column::NextCheckAt, Expr::value(at)),
        (targets::Column::WentDownAt, Expr::value(Option::<DateTime<Utc>>::None)),
    ]
}

/// The columns a reboot spell sets, cleared when it ends, and the end time.
fn reboot_ended(at: DateTime<Utc>) -> Vec<(targets::Column, SimpleExpr)> {
    vec![
        (targets::Column::Try, Expr::value(0)),
        (targets::Column::RebootUntil, Expr::value(Option::<DateTime<Utc>>::None)),
        (targets::Column::NextCheckAt, Expr::value(Option::<DateTime<Utc>>::None)),
        (targets::Column::FinishedAt, Expr::value(at)),
    ]
}

/// The verification scan's verdict as `targets.verified_state` holds it:
/// `all_installed`, `none_installed`, `missing #1, #2`, or `no_detection_rule`
/// when the scan could judge nothing; patches it could not judge beside
/// others are named after `; no detection rule:`.
pub(super) fn verdict(installed: &[u32], missing: &[u32], unknown: &[u32]) -> String {
    let judged = if missing.is_empty() && installed.is_empty() && !unknown.is_empty() {
        return "no_detection_rule".to_owned();
    } else if missing.is_empty() {
        "all_installed".to_owned()
    } else if installed.is_empty() && unknown.is_empty() {
        "none_installed".to_owned()
    } else {
        format!("missing {}", numbered(missing))
    };
    if unknown.is_empty() {
        judged
    } else {
        format!("{judged}; no detection rule: {}", numbered(unknown))
    }
}

fn numbered(indexes: &[u32]) -> String {
    indexes.iter().map(|i| format!("#{i}")).collect::<Vec<_>>().join(", ")
}

impl Store {
    /// Applies check `check` of a rebooting target's `attempt`: its verdict
    /// when the machine is back on a new boot; otherwise the next check
    /// after `next_delay` (never later than `reboot_until`), or `failed`
    /// once `reboot_until` has passed.
    pub async fn record_reboot_check(
        &self,
        target_id: Uuid,
        attempt: u32,
        check: u32,
        found: &RebootCheck,
        next_delay: Duration,
    ) -> Result<RebootOutcome> {
        let at = self.now();
        let txn = self.begin().await?;
        let Some(target) = super::offline::due_check(&txn, target_id, TargetState::Rebooting, attempt, check).await?
        else {
            return Ok(RebootOutcome::Stale);
        };
        let outcome = match found {
            RebootCheck::Back { installed, missing, unknown } => {
                let verified = missing.is_empty();
                let detail = if verified {
                    format!("back after the reboot (check {check}); the verification scan finds every patch installed")
                } else {
                    format!(
                        "back after the reboot, but the verification scan finds patch {} missing",
                        numbered(missing)
                    )
                };
                let mut sets = reboot_ended(at);
                sets.push((targets::Column::VerifiedState, Expr::value(verdict(installed, missing, unknown))));
                sets.push((targets::Column::VerifiedAt, Expr::value(at)));
                let to = if verified { TargetState::Succeeded } else { TargetState::Failed };
                if !verified {
                    sets.push((targets::Column::Error, Expr::value(detail.as_str())));
                }
                end_reboot(&txn, at, &target, to, detail, sets, true).await?;
                if verified {
                    RebootOutcome::Verified
                } else {
                    RebootOutcome::MissingAfterReboot
                }
            }
            RebootCheck::Down(_) | RebootCheck::SameBoot if target.reboot_until.is_some_and(|until| at < until) => {
                let until = target.reboot_until.unwrap_or(at);
                let mut sets = Vec::new();
                if let RebootCheck::Down(reason) = found {
                    sets.push((targets::Column::Error, Expr::value(reason.as_str())));
                    if target.went_down_at.is_none() {
                        sets.push((targets::Column::WentDownAt, Expr::value(at)));
                    }
                }
                let next_check_at =
                    super::offline::next_check(&txn, &target, check, at, next_delay, until, sets).await?;
                RebootOutcome::Waiting { check: check + 1, next_check_at }
            }
            RebootCheck::Down(reason) => {
                let span = super::offline::span(reboot_timeout(&txn, target.rollout_id).await?);
                let detail = format!(
                    "did not come back after reboot within reboot_timeout ({span}); last check {check}: {reason}"
                );
                let mut sets = reboot_ended(at);
                sets.push((targets::Column::Error, Expr::value(detail.as_str())));
                // Nothing to clean up on a machine that is not there.
                end_reboot(&txn, at, &target, TargetState::Failed, detail, sets, false).await?;
                RebootOutcome::DidNotComeBack
            }
            RebootCheck::SameBoot => {
                let span = super::offline::span(reboot_timeout(&txn, target.rollout_id).await?);
                let detail = format!(
                    "did not come back after reboot within reboot_timeout ({span}): the machine answers, but its \
                     boot has not changed (the reboot did not happen)"
                );
                let mut sets = reboot_ended(at);
                sets.push((targets::Column::Error, Expr::value(detail.as_str())));
                end_reboot(&txn, at, &target, TargetState::Failed, detail, sets, true).await?;
                RebootOutcome::DidNotComeBack
            }
        };
        txn.commit().await?;
        Ok(outcome)
    }
}

/// The rollout's `reboot_timeout_seconds`, read in the check's transaction.
async fn reboot_timeout(txn: &DatabaseTransaction, rollout_id: Uuid) -> Result<u64> {
    let rollout = rollouts::Entity::find_by_id(rollout_id)
        .one(txn)
        .await?
        .ok_or_else(|| Error::NotFound { what: "rollout", id: rollout_id.to_string() })?;
    Ok(rollout_from(rollout)?.settings.reboot_timeout_seconds)
}

/// The end of a reboot spell (this attempt's, guarded): `succeeded` or
/// `failed`, with the slot freed (a dispatch request), the event, and the
/// agent's removal when the machine is there to remove it from.
async fn end_reboot(
    txn: &DatabaseTransaction,
    at: DateTime<Utc>,
    target: &Target,
    to: TargetState,
    detail: String,
    sets: Vec<(targets::Column, SimpleExpr)>,
    cleanup: bool,
) -> Result<()> {
    let mv = Move {
        rollout_id: target.rollout_id,
        target_id: target.id,
        attempt: Some(target.attempt),
        from: &[TargetState::Rebooting],
        to,
        detail: Some(detail.clone()),
        sets,
    };
    let Some(from) = apply_move(txn, at, mv).await? else { return Ok(()) };
    let mut messages =
        vec![dispatch_message(target.rollout_id), event_message(target.id, target.rollout_id, from, to, &detail, at)];
    if cleanup {
        messages.push(cleanup_message(target.id, target.attempt));
    }
    push_outbox(txn, at, messages).await
}

#[cfg(test)]
mod tests {
    use super::verdict;

    #[test]
    fn verdicts_name_what_is_missing_and_what_the_scan_could_not_judge() {
        assert_eq!(verdict(&[0, 1], &[], &[]), "all_installed");
        assert_eq!(verdict(&[], &[0, 1], &[]), "none_installed");
        assert_eq!(verdict(&[0], &[1], &[]), "missing #1");
        assert_eq!(verdict(&[], &[], &[0, 1]), "no_detection_rule");
        assert_eq!(verdict(&[0], &[], &[2]), "all_installed; no detection rule: #2");
        assert_eq!(verdict(&[], &[1], &[2]), "missing #1; no detection rule: #2");
    }
}
