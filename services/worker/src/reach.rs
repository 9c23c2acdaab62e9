//! The `reach` queue: checks of machines that are away.
//!
//! * Offline targets (rollouts with `retry_offline_for`): a connect to the
//!   target's port through its transport ([`Transport::reachable`]), no
//!   login and no credential read. The store decides what the answer means
//!   (back to `pending`, the next check, or `failed` when the time ran
//!   out); the checks' delays grow along `worker.offline_check_seconds`.
//! * Rebooting targets (a reboot after a successful deployment): the same
//!   connect, then a probe for the boot (the kernel's boot id over ssh, the last
//!   shutdown time over smb) compared with the
//!   one the deployment's probe read, and once the machine is back on a new
//!   boot the verification scan, whose result is the target's verdict
//!   ([`fleetpatch_store::RebootCheck`]). Paced by `worker.reboot_check_seconds`.

use std::time::Duration;

use fleetpatch_proto::state::TargetState;
use fleetpatch_proto::v1;
use fleetpatch_store::{CheckOutcome, Reachability, RebootCheck, RebootOutcome, Target};
use fleetpatch_transport::{PatchProbe, Transport};
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
        if target.state == TargetState::Rebooting && target.attempt == check.attempt {
            return self.reboot_check(target, check).await;
        }
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

impl Worker {
    /// One check of a machine that reboots after its deployment.
    async fn reboot_check(&self, target: Target, check: v1::ReachabilityCheck) -> Result<(), JobError> {
        let transport = self
            .transports
            .get(&target.transport)
            .cloned()
            .ok_or_else(|| JobError::Transient(format!("this worker has no {:?} transport", target.transport)))?;
        let found = self.look_for_new_boot(&target, transport.as_ref()).await?;
        let next_delay = check_delay(&self.options.reboot_check_seconds, check.check);
        let outcome = self.store.record_reboot_check(target.id, check.attempt, check.check, &found, next_delay).await?;
        let result = match (&found, &outcome) {
            (_, RebootOutcome::Stale) => "stale",
            (RebootCheck::Down(_), RebootOutcome::Waiting { .. }) => "down",
            (_, RebootOutcome::Waiting { .. }) => "same_boot",
            (_, RebootOutcome::Verified) => "verified",
            (_, RebootOutcome::MissingAfterReboot) => "missing_after_reboot",
            (_, RebootOutcome::DidNotComeBack) => "did_not_come_back",
        };
        metrics::counter!("fleetpatch_worker_reboot_checks_total", "result" => result).increment(1);
        tracing::info!(target_id = %target.id, check = check.check, outcome = ?outcome, "reboot check");
        Ok(())
    }

    /// Whether the machine is back on a new boot, and then what the
    /// verification scan finds. A machine whose transport reads no boot
    /// time counts as rebooted once a check saw it down and it answers again.
    async fn look_for_new_boot(&self, target: &Target, transport: &dyn Transport) -> Result<RebootCheck, JobError> {
        let down = |error: crate::StepError| match error {
            crate::StepError::Transport(error) => Ok(RebootCheck::Down(error.to_string())),
            crate::StepError::Store(error) => Err(JobError::from(error)),
            crate::StepError::Permanent(reason) => Err(JobError::Permanent(reason)),
        };
        let bare = crate::spec_without_credential(target);
        if let Err(error) = self.step("reachable", &bare.address(), transport.reachable(&bare)).await {
            return down(error);
        }
        // A credential that can no longer be used (its scope or secret
        // changed since the deployment) is a finding like a refused login:
        // the target fails when reboot_timeout runs out, not never.
        let spec = match self.target_spec(target) {
            Ok(spec) => spec,
            Err(error) => return Ok(RebootCheck::Down(error.to_string())),
        };
        let address = spec.address();
        let now = match self.step("probe", &address, transport.probe(&spec, &[])).await {
            Ok(probe) => probe,
            Err(error) => return down(error),
        };
        let rebooted = match (&target.boot_id, &now.boot_id) {
            (Some(before), Some(after)) if comparable_boots(before, after) => before != after,
            _ => target.went_down_at.is_some(),
        };
        if !rebooted {
            return Ok(RebootCheck::SameBoot);
        }
        let patches = self.store.patches(target.rollout_id).await?;
        let probes: Vec<PatchProbe> = patches
            .iter()
            .map(|p| PatchProbe { index: p.index, name: p.name.clone(), detection: p.detection.clone() })
            .collect();
        match self.step("verify", &address, transport.verify(&spec, &probes)).await {
            Ok(report) => {
                Ok(RebootCheck::Back { installed: report.installed, missing: report.missing, unknown: report.unknown })
            }
            Err(error) => down(error),
        }
    }
}

/// Whether two boot identities can be compared: both the kernel's boot id,
/// or both a boot time (the digits an `ssh` probe gave before it read the
/// boot id). Across that change the machine counts as rebooted only when it
/// was seen down.
fn comparable_boots(before: &str, after: &str) -> bool {
    let is_time = |id: &str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit());
    is_time(before) == is_time(after)
}

/// The delay before the check that follows `done` checks: the steps in
/// order, then the last one again.
fn check_delay(steps: &[u64], done: u32) -> Duration {
    Duration::from_secs(steps.get(done as usize).or(steps.last()).copied().unwrap_or(60))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_boot_id_is_compared_with_a_boot_id_and_a_boot_time_with_a_boot_time() {
        let id = "94106349-d25b-4301-9455-4a307e2d14ac";
        assert!(super::comparable_boots(id, "0f0e6a56-8a3c-4c43-9d3f-2b4b3c1c9e11"));
        assert!(super::comparable_boots("1796323425", "1796323999"));
        assert!(super::comparable_boots("boot-1", "boot-2"), "the simulated fleet's ids");
        assert!(!super::comparable_boots("1796323425", id), "a boot time stored before the boot id was read");
        assert!(!super::comparable_boots(id, "1796323425"));
    }

    #[test]
    fn checks_wait_longer_each_time_then_repeat_the_last_delay() {
        let steps = [60, 300, 900];
        let delays: Vec<u64> = (0..5).map(|done| super::check_delay(&steps, done).as_secs()).collect();
        assert_eq!(delays, [60, 300, 900, 900, 900]);
    }
}
