//! Reachability checks of offline targets (rollouts with
//! `retry_offline_for`): a connect to the target's port through its
//! transport ([`Transport::reachable`]), no login and no credential read.
//! The store decides what the answer means (back to `pending`, the next
//! check, or `failed` when the time ran out); the checks' delays grow
//! along `worker.offline_check_seconds`.

use std::time::Duration;

use fleetpatch_proto::state::TargetState;
use fleetpatch_proto::v1;
use fleetpatch_store::{CheckOutcome, Reachability};
use uuid::Uuid;

use crate::{JobError, Worker};

impl Worker {
    /// The delay before the check that follows `done` checks.
    pub(crate) fn offline_check_delay(&self, done: u32) -> Duration {
        check_delay(&self.options.offline_check_seconds, done)
    }

    pub(crate) async fn reach(&self, check: v1::ReachabilityCheck) -> Result<(), JobError> {
        let target_id = Uuid::parse_str(&check.target_id)
            .map_err(|e| JobError::Permanent(format!("reachability check target id: {e}")))?;
        let target = self.store.target(target_id).await?;
        if target.state != TargetState::Offline || target.attempt != check.attempt {
            tracing::debug!(target_id = %target_id, state = %target.state, "reachability check is stale; dropped");
            return Ok(());
        }
        let transport = self
            .transports
            .get(&target.transport)
            .cloned()
            .ok_or_else(|| JobError::Transient(format!("this worker has no {:?} transport", target.transport)))?;
        // A connect needs no credential: none is resolved or read here.
        let spec = crate::spec_without_credential(&target);
        let found = match self.step("reachable", &spec.address(), transport.reachable(&spec)).await {
            Ok(()) => Reachability::Answered,
            Err(crate::StepError::Transport(error)) => Reachability::Silent(error.to_string()),
            Err(crate::StepError::Store(error)) => return Err(error.into()),
            Err(crate::StepError::Permanent(reason)) => return Err(JobError::Permanent(reason)),
        };
        let next_delay = self.offline_check_delay(check.check);
        let outcome = self.store.record_reachability(target.id, check.attempt, check.check, &found, next_delay).await?;
        let result = match &outcome {
            CheckOutcome::Stale => "stale",
            CheckOutcome::BackOnline => "answered",
            CheckOutcome::StillOffline { .. } => "silent",
            CheckOutcome::GaveUp => "gave_up",
        };
        metrics::counter!("fleetpatch_worker_reachability_checks_total", "result" => result).increment(1);
        tracing::info!(target_id = %target.id, check = check.check, outcome = ?outcome, "reachability check");
        Ok(())
    }
}

/// The delay before the check that follows `done` checks: the steps in
/// order, then the last one again.
fn check_delay(steps: &[u64], done: u32) -> Duration {
    Duration::from_secs(steps.get(done as usize).or(steps.last()).copied().unwrap_or(60))
}

#[cfg(test)]
mod tests {
    #[test]
    fn checks_wait_longer_each_time_then_repeat_the_last_delay() {
        let steps = [60, 300, 900];
        let delays: Vec<u64> = (0..5).map(|done| super::check_delay(&steps, done).as_secs()).collect();
        assert_eq!(delays, [60, 300, 900, 900, 900]);
    }
}
