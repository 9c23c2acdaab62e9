//! Domain types the store takes and returns (the API layer converts its
//! requests into these; the entities stay inside the store).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use fleetpatch_proto::plan::{Detection, InstallerKind, RebootPolicy};
pub use fleetpatch_proto::relay::{RelayFallback, RelayRule};
use fleetpatch_proto::state::{PatchState, RolloutState, TargetState};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::schedule::Schedule;

/// One wave of a rollout: dispatched only after the previous wave finished
/// within its failure threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveSpec {
    pub name: String,
    /// Number of targets in the wave; the last wave takes the rest when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// The rollout halts (paused) when more than this share of the wave's
    /// targets failed, could not be reached or timed out.
    pub max_failure_percent: f64,
    /// When the wave ends within its threshold, the rollout waits in
    /// `awaiting_approval` before the next wave.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_approval: bool,
    /// Automatic promotion (ConfigMgr's phased deployment): once the wave
    /// has ended this long ago (its soak time) and at least
    /// `min_success_percent` of its targets succeeded, the next wave starts
    /// without an operator; below that rate it keeps waiting for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote_after_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_success_percent: Option<f64>,
}

impl WaveSpec {
    /// A wave with neither approval nor automatic promotion.
    pub fn new(name: impl Into<String>, size: Option<u32>, max_failure_percent: f64) -> WaveSpec {
        WaveSpec {
            name: name.into(),
            size,
            max_failure_percent,
            require_approval: false,
            promote_after_seconds: None,
            min_success_percent: None,
        }
    }

    /// Whether the next wave waits after this one.
    pub fn gated(&self) -> bool {
        self.require_approval || self.promote_after_seconds.is_some()
    }
}

/// Rollout-wide settings that travel into every deployment plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSettings {
    pub heartbeat_seconds: u32,
    pub reboot: RebootPolicy,
    /// Connection tries per attempt for unreachable targets (first try included).
    pub max_tries: u32,
    /// How long a target that could not be reached after `max_tries` waits
    /// as `offline` for the machine to answer again (None: it fails at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_offline_for_seconds: Option<u64>,
    /// With a reboot: how long the worker waits for the machine to come
    /// back before the target fails ("did not come back after reboot").
    #[serde(default = "default_reboot_timeout_seconds")]
    pub reboot_timeout_seconds: u64,
    pub keep_files: bool,
    /// Relays the targets pull their installers from, by label (before the
    /// workers' own `worker.relays`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<RelayRule>,
    /// When a target's relay does not answer: push the installers, or not.
    #[serde(default, skip_serializing_if = "RelayFallback::is_push")]
    pub relay_fallback: RelayFallback,
    /// When targets may be dispatched (start time, maintenance windows,
    /// deadline); the default: at once and at any time.
    #[serde(default, skip_serializing_if = "Schedule::is_unrestricted")]
    pub schedule: Schedule,
}

/// How long a machine has to come back after its reboot, unless the rollout says.
pub const DEFAULT_REBOOT_TIMEOUT_SECONDS: u64 = 1_800;

fn default_reboot_timeout_seconds() -> u64 {
    DEFAULT_REBOOT_TIMEOUT_SECONDS
}

impl Default for RolloutSettings {
    fn default() -> Self {
        Self {
            heartbeat_seconds: 30,
            reboot: RebootPolicy::Never,
            max_tries: 3,
            retry_offline_for_seconds: None,
            reboot_timeout_seconds: DEFAULT_REBOOT_TIMEOUT_SECONDS,
            keep_files: false,
            relays: Vec::new(),
            relay_fallback: RelayFallback::Push,
            schedule: Schedule::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewPatch {
    pub name: String,
    pub kb: Option<String>,
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub installer: InstallerKind,
    pub arguments: String,
    pub success_codes: Vec<i32>,
    pub reboot_codes: Vec<i32>,
    pub timeout_seconds: u32,
    pub detection: Option<Detection>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewTarget {
    pub host: String,
    pub port: Option<u16>,
    pub transport: String,
    pub labels: BTreeMap<String, String>,
    /// Name of a credential defined where the workers run (`[credentials.<name>]`), never a secret or its location.
    pub credential: Option<String>,
    /// Index into the rollout's waves.
    pub wave: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NewRollout {
    pub name: String,
    pub concurrency: u32,
    pub timeout_seconds: u32,
    pub waves: Vec<WaveSpec>,
    pub settings: RolloutSettings,
    pub patches: Vec<NewPatch>,
    pub targets: Vec<NewTarget>,
}

impl NewRollout {
    /// A synthetic rollout for benchmarks that play the workers themselves:
    /// one wave, concurrency = the fleet, `patches` MSU patches without a
    /// detection rule, `targets` hosts `bench-000000`... on the `bench`
    /// transport, which no worker offers (so no worker ever takes them).
    pub fn synthetic(name: &str, targets: usize, patches: usize, timeout_seconds: u32) -> NewRollout {
        NewRollout {
            name: name.into(),
            concurrency: targets as u32,
            timeout_seconds,
            waves: vec![WaveSpec::new("all", None, 100.0)],
            settings: RolloutSettings::default(),
            patches: (0..patches)
                .map(|i| NewPatch {
                    name: format!("KB60{i:05}"),
                    kb: None,
                    file: format!("kb60{i:05}.msu"),
                    sha256: format!("{:064x}", i + 1),
                    size: 1,
                    installer: InstallerKind::Msu,
                    arguments: String::new(),
                    success_codes: vec![0],
                    reboot_codes: vec![3010],
                    timeout_seconds: 600,
                    detection: None,
                })
                .collect(),
            targets: (0..targets)
                .map(|i| NewTarget {
                    host: format!("bench-{i:06}"),
                    port: None,
                    transport: "bench".into(),
                    labels: BTreeMap::new(),
                    credential: None,
                    wave: 0,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rollout {
    pub id: Uuid,
    pub name: String,
    pub state: RolloutState,
    pub pause_reason: Option<String>,
    pub current_wave: u32,
    pub concurrency: u32,
    pub timeout_seconds: u32,
    pub waves: Vec<WaveSpec>,
    pub settings: RolloutSettings,
    /// While `waiting_for_window`: when the next window opens (or the
    /// deadline, if it comes first).
    pub next_window_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Patch {
    pub index: u32,
    pub name: String,
    pub kb: Option<String>,
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub installer: InstallerKind,
    pub arguments: String,
    pub success_codes: Vec<i32>,
    pub reboot_codes: Vec<i32>,
    pub timeout_seconds: u32,
    pub detection: Option<Detection>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    pub id: Uuid,
    pub rollout_id: Uuid,
    pub ordinal: u32,
    pub host: String,
    pub port: Option<u16>,
    pub transport: String,
    pub labels: BTreeMap<String, String>,
    /// Name of a credential defined where the workers run (`[credentials.<name>]`), never a secret or its location.
    pub credential: Option<String>,
    pub wave: u32,
    pub state: TargetState,
    pub attempt: u32,
    pub tries: u32,
    pub timeout_seconds: u32,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub os: Option<String>,
    pub arch: Option<String>,
    pub queued_at: Option<DateTime<Utc>>,
    pub running_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub verified_state: Option<String>,
    pub verified_at: Option<DateTime<Utc>>,
    /// While `offline`: when its `retry_offline_for` runs out and it fails.
    pub offline_until: Option<DateTime<Utc>>,
    /// While `offline` or `rebooting`: when the next reachability check is due.
    pub next_check_at: Option<DateTime<Utc>>,
    /// While `rebooting`: when its `reboot_timeout` runs out and it fails.
    pub reboot_until: Option<DateTime<Utc>>,
    /// While `rebooting`: when a check first found the machine down.
    pub went_down_at: Option<DateTime<Utc>>,
    /// How the installers of its current attempt reached it: `push`,
    /// `relay http://…` (its agent pulled them), or `push: relay http://…
    /// did not answer (…)`. None before the worker staged the deployment.
    pub delivery: Option<String>,
    /// The boot the probe found (boot id, boot time, or another value that changes
    /// with every boot), when the transport can read one.
    pub boot_id: Option<String>,
    #[serde(skip)]
    pub token_hash: Option<String>,
    #[serde(skip)]
    pub token_nonce: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetPatch {
    pub patch_index: u32,
    pub state: PatchState,
    pub exit_code: Option<i32>,
    pub outcome: Option<String>,
    pub reboot_required: bool,
    pub output_tail: Option<String>,
    pub error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    pub target_id: Uuid,
    pub from: String,
    pub to: String,
    pub at: DateTime<Utc>,
    pub detail: Option<String>,
}

/// The agent process that produced a report: a random number it drew when
/// it started (0: an agent older than the field). Two instances within one
/// attempt mean the deployment's agent ran twice (a restart on the host, or
/// a second start), and each run's reports are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentInstance(pub u64);

impl AgentInstance {
    /// As stored: the same 64 bits in a signed column.
    pub fn to_column(self) -> i64 {
        self.0 as i64
    }

    pub fn from_column(value: i64) -> Self {
        Self(value as u64)
    }
}

impl std::fmt::Display for AgentInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for AgentInstance {
    type Err = std::num::ParseIntError;

    fn from_str(raw: &str) -> std::result::Result<Self, Self::Err> {
        u64::from_str_radix(raw, 16).map(Self)
    }
}

/// Sixteen hex digits in JSON (a u64 does not survive JavaScript's numbers).
impl Serialize for AgentInstance {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Where a page of a target's events ends: its last event's (attempt, seq,
/// agent instance). Written `attempt.seq.instance` (the instance in hex);
/// the older `attempt.seq` means "after every event numbered seq".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventCursor {
    pub attempt: u32,
    pub seq: u64,
    pub agent_instance: Option<AgentInstance>,
}

impl EventCursor {
    /// The cursor that continues after `event`.
    pub fn after(event: &AgentEvent) -> Self {
        Self { attempt: event.attempt, seq: event.seq, agent_instance: Some(event.agent_instance) }
    }
}

impl std::fmt::Display for EventCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.attempt, self.seq)?;
        if let Some(instance) = self.agent_instance {
            write!(f, ".{instance}")?;
        }
        Ok(())
    }
}

/// A text that is not an events cursor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an events cursor (attempt.seq.instance); pass the events_next_after of the previous page")]
pub struct BadEventCursor(pub String);

impl std::str::FromStr for EventCursor {
    type Err = BadEventCursor;

    fn from_str(raw: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || BadEventCursor(raw.to_owned());
        let mut parts = raw.split('.');
        let attempt = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let seq = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let agent_instance = parts.next().map(|p| p.parse::<AgentInstance>().map_err(|_| bad())).transpose()?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self { attempt, seq, agent_instance })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentEvent {
    pub attempt: u32,
    pub agent_instance: AgentInstance,
    pub seq: u64,
    pub kind: String,
    pub patch_index: Option<u32>,
    pub exit_code: Option<i32>,
    pub detail: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// The heartbeats of one agent run (an attempt's agent instance), kept as
/// a summary: a heartbeat only moves its target's deadline, so the store
/// keeps how many did, the highest seq and when the first and the last
/// arrived, not a row each (unless `collector.heartbeat_events` is
/// `every`, which also keeps them as [`AgentEvent`]s).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeartbeatSummary {
    pub attempt: u32,
    pub agent_instance: AgentInstance,
    /// Heartbeats that moved the deadline (a resent one is not counted).
    pub count: u64,
    pub last_seq: u64,
    /// The patch the last heartbeat was sent during, if any.
    pub patch_index: Option<u32>,
    pub first_received_at: DateTime<Utc>,
    pub last_received_at: DateTime<Utc>,
}

/// A report an agent sent, named for [`crate::ReportIntake::stored_report_count`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentReport {
    pub agent_instance: AgentInstance,
    pub seq: u64,
    /// Heartbeats are looked up in their run's summary, not as events.
    pub heartbeat: bool,
}

/// What the collector stores of an agent's heartbeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeartbeatEvents {
    /// One [`HeartbeatSummary`] per agent run (the default).
    #[default]
    Summary,
    /// The summary, and an [`AgentEvent`] row for every heartbeat.
    Every,
}

/// Counts of targets per state, for the rollout and for each wave.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Progress {
    pub total: u64,
    pub by_state: BTreeMap<String, u64>,
    pub waves: Vec<WaveProgress>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WaveProgress {
    pub index: u32,
    pub name: String,
    pub total: u64,
    pub by_state: BTreeMap<String, u64>,
}

/// Everything a worker needs to deploy one target.
#[derive(Debug, Clone)]
pub struct DeployContext {
    pub target: Target,
    pub rollout: Rollout,
    pub patches: Vec<Patch>,
}

/// A report the collector accepted from an authenticated agent.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingReport {
    pub target_id: Uuid,
    pub attempt: u32,
    pub agent_instance: AgentInstance,
    pub seq: u64,
    pub sent_at: Option<DateTime<Utc>>,
    pub kind: ReportKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReportKind {
    Started { patch_index: u32 },
    Finished { patch_index: u32, exit_code: i32, outcome: PatchOutcomeKind, output_tail: String },
    Heartbeat { patch_index: Option<u32> },
    Final { success: bool, reboot_required: bool, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchOutcomeKind {
    Installed,
    InstalledRebootRequired,
    Failed,
    TimedOut,
    ChecksumMismatch,
}

impl PatchOutcomeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Installed => "installed",
            Self::InstalledRebootRequired => "installed_reboot_required",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::ChecksumMismatch => "checksum_mismatch",
        }
    }
    pub fn succeeded(self) -> bool {
        matches!(self, Self::Installed | Self::InstalledRebootRequired)
    }
}

/// What the store did with one report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportResult {
    Accepted,
    Duplicate,
    /// Its target is not in the store: nothing of it was stored (the
    /// collector authenticates a report by its target's row first, so only
    /// a caller that skips that sees this).
    UnknownTarget,
}

#[cfg(test)]
mod synthetic_tests {
    use super::NewRollout;

    #[test]
    fn a_synthetic_rollout_has_its_fleet_on_the_bench_transport() {
        let rollout = NewRollout::synthetic("s", 3, 2, 7);
        assert_eq!(
            (rollout.targets.len(), rollout.patches.len(), rollout.concurrency, rollout.timeout_seconds),
            (3, 2, 3, 7)
        );
        assert!(rollout.targets.iter().all(|t| t.transport == "bench"), "no worker offers `bench`");
        let hosts: std::collections::BTreeSet<_> = rollout.targets.iter().map(|t| t.host.as_str()).collect();
        assert_eq!(hosts.len(), 3, "hosts are distinct");
    }
}

/// A report about a rollout that the API issued, by its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceRecord {
    /// sha256 of the report's bytes, 64 lower-case hex digits.
    pub sha256: String,
    pub rollout_id: Uuid,
    /// `json`, `csv` or `html`.
    pub format: String,
    pub bytes: u64,
    pub created_at: DateTime<Utc>,
    /// Who asked for it (the API key's name or the token's subject).
    pub created_by: String,
}
