//! State machines. A target moves only along [`TargetState::can_move_to`];
//! the store applies each move as one guarded UPDATE (`WHERE state = from`).

use std::fmt;
use std::str::FromStr;

/// Where one target of a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Waiting for a free slot in its wave.
    Pending,
    /// Holds a slot; its deploy job is on the queue (or waiting for a retry).
    Queued,
    /// A worker is reading the target's OS, architecture and installed patches.
    Probing,
    /// A worker is copying agent, plan and installers to the target.
    Staging,
    /// A worker is installing and starting the agent.
    Installing,
    /// The agent runs; the watchdog is armed.
    Running,
    /// The agent reported success for every patch (or all were already installed).
    Succeeded,
    /// Failed: a patch failed, or the target could not be reached or prepared.
    Failed,
    /// No report within the timeout; remaining patches marked failed.
    TimedOut,
    /// Never dispatched: the rollout was aborted.
    Cancelled,
    /// Never dispatched: the rollout's deadline passed while the target
    /// waited for its maintenance window.
    MissedWindow,
    /// Could not be reached after `max_tries`; holds no slot while a cheap
    /// reachability check runs at growing intervals. Back to `pending` when
    /// the machine answers, `failed` when `retry_offline_for` runs out.
    Offline,
    /// The agent reported success and the rollout's reboot policy asks for
    /// a reboot: the agent requested it, and the worker waits for the
    /// machine to come back (its port answers and its boot changed),
    /// then runs the verification scan. Holds its slot.
    Rebooting,
}

impl TargetState {
    pub const ALL: [TargetState; 13] = [
        Self::Pending,
        Self::Queued,
        Self::Probing,
        Self::Staging,
        Self::Installing,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::TimedOut,
        Self::Cancelled,
        Self::MissedWindow,
        Self::Offline,
        Self::Rebooting,
    ];
    /// States that hold one of the rollout's concurrency slots.
    pub const IN_FLIGHT: [TargetState; 6] =
        [Self::Queued, Self::Probing, Self::Staging, Self::Installing, Self::Running, Self::Rebooting];
    /// States a target leaves only through "retry failed".
    pub const FINAL: [TargetState; 5] =
        [Self::Succeeded, Self::Failed, Self::TimedOut, Self::Cancelled, Self::MissedWindow];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Probing => "probing",
            Self::Staging => "staging",
            Self::Installing => "installing",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::MissedWindow => "missed_window",
            Self::Offline => "offline",
            Self::Rebooting => "rebooting",
        }
    }

    pub fn is_in_flight(self) -> bool {
        Self::IN_FLIGHT.contains(&self)
    }

    pub fn is_final(self) -> bool {
        Self::FINAL.contains(&self)
    }

    /// Counts against a wave's failure threshold.
    pub fn is_failure(self) -> bool {
        matches!(self, Self::Failed | Self::TimedOut)
    }

    /// The edges of the state machine.
    pub fn can_move_to(self, to: TargetState) -> bool {
        use TargetState::*;
        match (self, to) {
            (Pending, Queued) | (Pending, Cancelled) | (Pending, MissedWindow) => true,
            (Queued, Probing) => true,
            (Probing, Staging) | (Staging, Installing) | (Installing, Running) => true,
            // A worker takes over a job whose worker died mid-way.
            (Probing | Staging | Installing, Probing) => true,
            // The agent's final report can arrive before the worker recorded
            // `running` (or while a worker takes over from a dead one).
            (Staging | Installing, Succeeded) => true,
            // A transient error sends the target back to wait for a retry.
            (Probing | Staging | Installing, Queued) => true,
            // Everything already installed: nothing to stage.
            (Probing, Succeeded) => true,
            (Queued | Probing | Staging | Installing | Running, Failed) => true,
            (Running, Succeeded) | (Running, TimedOut) => true,
            // "retry failed"
            (Failed | TimedOut, Pending) => true,
            // Unreachable after every try, with `retry_offline_for` set: the
            // slot is freed and a reachability check waits for the machine.
            (Probing | Staging | Installing, Offline) => true,
            // It answered (it waits for a slot and its window again), its time
            // ran out (now it counts as a failure), or the rollout was aborted.
            (Offline, Pending) | (Offline, Failed) | (Offline, Cancelled) => true,
            // The agent's successful final result with a reboot to follow
            // (also before the worker recorded `running`).
            (Staging | Installing | Running, Rebooting) => true,
            // Back with the patches verified, or not: missing after the
            // reboot, or not back within `reboot_timeout`.
            (Rebooting, Succeeded) | (Rebooting, Failed) => true,
            _ => false,
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of [`TargetState::ALL`] (or [`PatchState::ALL`]).
#[derive(Debug, thiserror::Error)]
#[error("unknown state {0:?}; expected one of {1}")]
pub struct UnknownState(pub String, pub &'static str);

impl FromStr for TargetState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| {
            UnknownState(
                s.to_owned(),
                "pending, queued, probing, staging, installing, running, succeeded, failed, timed_out, cancelled, \
                 missed_window, offline, rebooting",
            )
        })
    }
}

/// Where one patch on one target stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchState {
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Already installed on the target (found by the probe); not deployed.
    Skipped,
}

impl PatchState {
    pub const ALL: [PatchState; 5] = [Self::Pending, Self::Running, Self::Succeeded, Self::Failed, Self::Skipped];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

impl fmt::Display for PatchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PatchState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned(), "pending, running, succeeded, failed, skipped"))
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Dispatching targets as slots free up.
    Running,
    /// Dispatches nothing new (by an operator, or halted by a wave's failure threshold).
    Paused,
    /// A wave that requires approval ended within its failure threshold: the
    /// next wave starts when an operator approves (or when the wave's
    /// automatic promotion finds its soak time over and its success rate met).
    AwaitingApproval,
    /// Nothing may be dispatched now (before its start time, or no window
    /// of its pending targets is open) and nothing is in flight; dispatch
    /// resumes when the next window opens (`next_window_at`).
    WaitingForWindow,
    /// Stopped by an operator; targets not yet dispatched are cancelled.
    Aborted,
    /// Every target reached a final state.
    Completed,
}

impl RolloutState {
    pub const ALL: [RolloutState; 6] =
        [Self::Running, Self::Paused, Self::AwaitingApproval, Self::WaitingForWindow, Self::Aborted, Self::Completed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::AwaitingApproval => "awaiting_approval",
            Self::WaitingForWindow => "waiting_for_window",
            Self::Aborted => "aborted",
            Self::Completed => "completed",
        }
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RolloutState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| {
            UnknownState(s.to_owned(), "running, paused, awaiting_approval, waiting_for_window, aborted, completed")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_its_name() {
        for state in TargetState::ALL {
            assert_eq!(state.as_str().parse::<TargetState>().unwrap(), state);
        }
        for state in PatchState::ALL {
            assert_eq!(state.as_str().parse::<PatchState>().unwrap(), state);
        }
        for state in RolloutState::ALL {
            assert_eq!(state.as_str().parse::<RolloutState>().unwrap(), state);
        }
        assert!("done".parse::<TargetState>().unwrap_err().to_string().contains("\"done\""));
    }

    #[test]
    fn final_states_are_left_only_by_retry() {
        for from in TargetState::FINAL {
            for to in TargetState::ALL {
                if from.can_move_to(to) {
                    assert_eq!(to, TargetState::Pending, "{from} -> {to}");
                }
            }
        }
        assert!(!TargetState::Succeeded.can_move_to(TargetState::Pending));
        assert!(!TargetState::Pending.can_move_to(TargetState::Running));
    }

    #[test]
    fn an_offline_target_holds_no_slot_and_leaves_only_to_pending_failed_or_cancelled() {
        let offline = TargetState::Offline;
        assert!(!offline.is_in_flight() && !offline.is_final() && !offline.is_failure());
        let exits: Vec<_> = TargetState::ALL.into_iter().filter(|to| offline.can_move_to(*to)).collect();
        assert_eq!(exits, [TargetState::Pending, TargetState::Failed, TargetState::Cancelled]);
        let entries: Vec<_> = TargetState::ALL.into_iter().filter(|from| from.can_move_to(offline)).collect();
        assert_eq!(entries, [TargetState::Probing, TargetState::Staging, TargetState::Installing]);
    }

    #[test]
    fn a_rebooting_target_holds_its_slot_and_ends_succeeded_or_failed() {
        let rebooting = TargetState::Rebooting;
        assert!(rebooting.is_in_flight() && !rebooting.is_final() && !rebooting.is_failure());
        let exits: Vec<_> = TargetState::ALL.into_iter().filter(|to| rebooting.can_move_to(*to)).collect();
        assert_eq!(exits, [TargetState::Succeeded, TargetState::Failed]);
        let entries: Vec<_> = TargetState::ALL.into_iter().filter(|from| from.can_move_to(rebooting)).collect();
        assert_eq!(entries, [TargetState::Staging, TargetState::Installing, TargetState::Running]);
    }
}
