//! The body of `POST /v1/rollouts` and its validation: every field checked, every
//! wrong one named, against the administrator's limits ([`InputPolicy`]).

use super::*;
use chrono::{DateTime, Utc};
use fleetpatch_proto::relay::{RelayFallback, RelayRule};
use fleetpatch_store::schedule::{MaintenanceWindow, NoWindow, Schedule, WindowError};

fn default_concurrency() -> u32 {
    10
}
fn default_timeout() -> u32 {
    600
}
fn default_heartbeat() -> u32 {
    30
}
fn default_max_tries() -> u32 {
    3
}
fn default_reboot_timeout_seconds() -> u64 {
    fleetpatch_store::DEFAULT_REBOOT_TIMEOUT_SECONDS
}
fn default_success_codes() -> Vec<i32> {
    vec![0, 3010]
}
fn default_reboot_codes() -> Vec<i32> {
    vec![3010]
}
fn default_patch_timeout() -> u32 {
    3600
}
fn default_transport() -> String {
    "sim".into()
}
fn default_max_failure() -> f64 {
    100.0
}

/// `POST /v1/rollouts`. `T` is how its targets are read: a list (the
/// default), or [`TargetCount`] when the API reads a large body's other
/// fields first and its targets in passes of their own (`intake.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout<T = Vec<TargetRequest>> {
    pub name: String,
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// Seconds without a report before a target is timed out.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u32,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u32,
    #[serde(default = "default_max_tries")]
    pub max_tries: u32,
    /// A target still unreachable after `max_tries` waits as `offline` this
    /// long for its machine to answer again, instead of failing at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_offline_for_seconds: Option<u64>,
    /// With a reboot (`reboot: if_required|always`): how long a machine has
    /// to come back on a new boot before the target fails.
    #[serde(default = "default_reboot_timeout_seconds")]
    pub reboot_timeout_seconds: u64,
    #[serde(default)]
    pub reboot: RebootPolicy,
    #[serde(default)]
    pub keep_files: bool,
    /// Relays the targets pull their installers from, by label; the first
    /// matching rule wins, before the workers' own `worker.relays`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<RelayRule>,
    /// When a target's relay does not answer: `push` the installers (the
    /// default) or `fail` (retried like an unreachable target).
    #[serde(default, skip_serializing_if = "RelayFallback::is_push")]
    pub relay_fallback: RelayFallback,
    /// The credential of every target that names none (a name defined in
    /// `[credentials]` where the workers run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    #[serde(default)]
    pub waves: Vec<WaveRequest>,
    /// Nothing is dispatched before this time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<DateTime<Utc>>,
    /// Recurring maintenance windows; targets are dispatched only inside
    /// theirs (a window with `labels` applies to the targets it selects).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<MaintenanceWindow>,
    /// Targets not dispatched by this time end as `missed_window` (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    pub patches: Vec<PatchRequest>,
    pub targets: T,
}

/// The `targets` of a request read without keeping them: how many there
/// are (each one any JSON value; they are checked in the next pass).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetCount(pub usize);

impl<'de> Deserialize<'de> for TargetCount {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Counter;
        impl<'de> serde::de::Visitor<'de> for Counter {
            type Value = TargetCount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of targets")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<TargetCount, A::Error> {
                let mut count = 0;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    count += 1;
                }
                Ok(TargetCount(count))
            }
        }
        deserializer.deserialize_seq(Counter)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveRequest {
    pub name: String,
    #[serde(default)]
    pub size: Option<u32>,
    #[serde(default = "default_max_failure")]
    pub max_failure_percent: f64,
    /// After this wave, wait in `awaiting_approval` for `rollout approve`.
    #[serde(default)]
    pub require_approval: bool,
    /// Promote to the next wave automatically this long after the wave
    /// ended, if `min_success_percent` of its targets succeeded.
    #[serde(default)]
    pub promote_after_seconds: Option<u64>,
    #[serde(default)]
    pub min_success_percent: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchRequest {
    pub name: String,
    #[serde(default)]
    pub kb: Option<String>,
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub size: u64,
    pub installer: InstallerKind,
    #[serde(default)]
    pub arguments: String,
    #[serde(default = "default_success_codes")]
    pub success_codes: Vec<i32>,
    #[serde(default = "default_reboot_codes")]
    pub reboot_codes: Vec<i32>,
    #[serde(default = "default_patch_timeout")]
    pub timeout_seconds: u32,
    #[serde(default)]
    pub detection: Option<Detection>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRequest {
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default = "default_transport")]
    pub transport: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Name of a credential an administrator defined where the workers run
    /// (`[credentials.<name>]`); the worker checks its scope against this
    /// target before it reads the secret.
    #[serde(default)]
    pub credential: Option<String>,
    /// Refused: callers name credentials, they never point at secrets. Kept
    /// in the schema only to answer with what to do instead.
    #[serde(default, skip_serializing)]
    pub credential_ref: Option<serde_json::Value>,
    /// Name of the wave; targets without one fill the waves in order.
    #[serde(default)]
    pub wave: Option<String>,
}

fn push(errors: &mut Vec<FieldError>, field: impl Into<String>, message: impl Into<String>) {
    errors.push(FieldError { field: field.into(), message: message.into() });
}

/// Checks a request and turns it into the store's rollout. Every error
/// names its field. The API's streaming intake (`intake.rs`) runs the same
/// steps over a body it reads in passes: [`check_header`], then
/// [`TargetRules::check`] and [`WaveAssigner::count_explicit`] for each
/// target, [`check_content`], [`into_rollout`] and
/// [`WaveAssigner::assign`] for each target.
pub fn validate(
    request: CreateRollout,
    content_dir: &std::path::Path,
    policy: &InputPolicy,
) -> Result<NewRollout, Problem> {
    let mut errors = Vec::new();
    check_header(&request, request.targets.len(), policy, &mut errors)?;
    let rules = TargetRules::new(&request);
    let mut needs_content = false;
    for (i, target) in request.targets.iter().enumerate() {
        rules.check(i, target, policy, &mut errors);
        needs_content |= target.transport != "sim";
        if errors.len() > MAX_FIELD_ERRORS {
            break;
        }
    }
    if needs_content {
        check_content(request.patches.iter().map(|p| p.sha256.as_str()), content_dir, &mut errors);
    }
    if !errors.is_empty() {
        return Err(Problem::invalid(errors));
    }
    let (mut new, targets, mut assigner) = into_rollout(request);
    for target in &targets {
        assigner.count_explicit(target);
    }
    new.targets = targets.into_iter().map(|target| assigner.assign(target)).collect();
    Ok(new)
}

/// Past this many wrong fields, the rest of the targets are not checked.
pub const MAX_FIELD_ERRORS: usize = 50;

/// Checks every field but the targets themselves, `targets` of them
/// counted. Too many targets is answered at once, without the rest.
pub fn check_header<T>(
    request: &CreateRollout<T>,
    targets: usize,
    policy: &InputPolicy,
    errors: &mut Vec<FieldError>,
) -> Result<(), Problem> {
    if request.name.trim().is_empty() {
        push(errors, "name", "must not be empty");
    }
    if request.concurrency == 0 || request.concurrency > 100_000 {
        push(errors, "concurrency", format!("must be between 1 and 100000, got {}", request.concurrency));
    }
    if request.timeout_seconds == 0 {
        push(errors, "timeout_seconds", "must be at least 1");
    }
    if request.heartbeat_seconds == 0 || request.heartbeat_seconds >= request.timeout_seconds.max(1) {
        push(
            errors,
            "heartbeat_seconds",
            format!("must be at least 1 and below timeout_seconds ({})", request.timeout_seconds),
        );
    }
    if request.max_tries == 0 {
        push(errors, "max_tries", "must be at least 1");
    }
    if request.reboot_timeout_seconds == 0 || request.reboot_timeout_seconds > 86_400 {
        push(
            errors,
            "reboot_timeout_seconds",
            format!("must be between 1 and 86400 (1 day), got {}", request.reboot_timeout_seconds),
        );
    }
    if let Some(seconds) = request.retry_offline_for_seconds {
        if seconds == 0 || seconds > 30 * 86_400 {
            push(
                errors,
                "retry_offline_for_seconds",
                format!("must be between 1 and 2592000 (30 days), got {seconds}"),
            );
        }
    }
    if let Err((index, error)) = fleetpatch_proto::relay::validate_rules(&request.relays) {
        push(errors, format!("relays[{index}]"), error.to_string());
    }
    if request.patches.is_empty() {
        push(errors, "patches", "must name at least one patch");
    }
    if targets == 0 {
        push(errors, "targets", "must name at least one target");
    }
    if targets > policy.max_targets_per_rollout {
        push(
            errors,
            "targets",
            format!(
                "{targets} targets; at most {} per rollout (scheduler.max_targets_per_rollout): split the rollout, or \
                 ask an administrator to raise the limit",
                policy.max_targets_per_rollout
            ),
        );
        return Err(Problem::invalid(std::mem::take(errors)));
    }
    if let Some(name) = &request.credential {
        if let Err(error) = policy.check_credential(name) {
            push(errors, "credential", error.to_string());
        }
    }
    let mut wave_names = HashSet::new();
    for (i, wave) in request.waves.iter().enumerate() {
        if wave.name.trim().is_empty() {
            push(errors, format!("waves[{i}].name"), "must not be empty");
        } else if !wave_names.insert(wave.name.as_str()) {
            push(errors, format!("waves[{i}].name"), format!("{:?} is used by another wave", wave.name));
        }
        if !(0.0..=100.0).contains(&wave.max_failure_percent) {
            push(errors, format!("waves[{i}].max_failure_percent"), "must be between 0 and 100");
        }
        if wave.size == Some(0) {
            push(errors, format!("waves[{i}].size"), "must be at least 1 (or left out for \"the rest\")");
        }
        if let Some(percent) = wave.min_success_percent {
            if !(0.0..=100.0).contains(&percent) {
                push(errors, format!("waves[{i}].min_success_percent"), "must be between 0 and 100");
            }
            if wave.promote_after_seconds.is_none() {
                push(
                    errors,
                    format!("waves[{i}].min_success_percent"),
                    "applies to automatic promotion only: set promote_after_seconds too (the soak time)",
                );
            }
        }
        if wave.promote_after_seconds.is_some() && wave.min_success_percent.is_none() {
            push(
                errors,
                format!("waves[{i}].promote_after_seconds"),
                "automatic promotion needs min_success_percent (the share of the wave's targets that must have \
                 succeeded)",
            );
        }
        if wave.promote_after_seconds.is_some_and(|seconds| seconds > 30 * 86_400) {
            push(errors, format!("waves[{i}].promote_after_seconds"), "must be at most 2592000 (30 days)");
        }
        if (wave.require_approval || wave.promote_after_seconds.is_some()) && i + 1 == request.waves.len() {
            push(
                errors,
                format!("waves[{i}]"),
                "the last wave has no next wave to approve or promote: remove require_approval and \
                 promote_after_seconds from it",
            );
        }
    }
    let mut patch_names = HashSet::new();
    for (i, patch) in request.patches.iter().enumerate() {
        if patch.name.trim().is_empty() {
            push(errors, format!("patches[{i}].name"), "must not be empty");
        } else if !patch_names.insert(patch.name.as_str()) {
            push(errors, format!("patches[{i}].name"), format!("{:?} is used by another patch", patch.name));
        }
        if patch.file.is_empty() || patch.file.contains(['/', '\\']) || patch.file == ".." || patch.file == "." {
            push(errors, format!("patches[{i}].file"), "must be a plain file name (no directories)");
        }
        if !content::is_sha256(&patch.sha256) {
            push(errors, format!("patches[{i}].sha256"), "must be 64 lower-case hex characters");
        }
        if patch.success_codes.is_empty() {
            push(errors, format!("patches[{i}].success_codes"), "must hold at least one exit code (usually 0)");
        }
        if patch.timeout_seconds == 0 {
            push(errors, format!("patches[{i}].timeout_seconds"), "must be at least 1");
        }
    }
    for (i, window) in request.windows.iter().enumerate() {
        if let Err(error) = window.check() {
            let field = match error {
                WindowError::NoDays => "days",
                WindowError::Start(_) => "start",
                WindowError::Duration => "duration_minutes",
                WindowError::TimeZone(_) => "time_zone",
            };
            push(errors, format!("windows[{i}].{field}"), error.to_string());
        }
    }
    if let (Some(start), Some(deadline)) = (request.start_at, request.deadline) {
        if deadline <= start {
            push(errors, "deadline", format!("must be after start_at ({})", start.to_rfc3339()));
        }
    }
    Ok(())
}

/// The checks of one target that depend on the rest of the request.
pub struct TargetRules {
    schedule: Schedule,
    wave_names: HashSet<String>,
}

impl TargetRules {
    pub fn new<T>(request: &CreateRollout<T>) -> Self {
        Self {
            schedule: Schedule { windows: request.windows.clone(), ..Schedule::default() },
            wave_names: request.waves.iter().map(|wave| wave.name.clone()).collect(),
        }
    }

    /// Checks `targets[i]`, each wrong field pushed to `errors`.
    pub fn check(&self, i: usize, target: &TargetRequest, policy: &InputPolicy, errors: &mut Vec<FieldError>) {
        let schedule = &self.schedule;
        if !schedule.windows.is_empty() && schedule.windows_for(&target.labels).is_err() {
            push(errors, format!("targets[{i}].labels"), NoWindow.to_string());
        }
        if target.host.trim().is_empty() {
            push(errors, format!("targets[{i}].host"), "must not be empty");
        }
        if !TRANSPORTS.contains(&target.transport.as_str()) {
            push(
                errors,
                format!("targets[{i}].transport"),
                format!("{:?} is not a transport; use one of {}", target.transport, TRANSPORTS.join(", ")),
            );
        }
        if target.credential_ref.is_some() {
            push(
                errors,
                format!("targets[{i}].credential_ref"),
                "secret references are no longer accepted from callers: ask an administrator to define a named \
                 credential ([credentials.<name>] where the workers run, with the hosts it may be used for) and \
                 name it with `credential: <name>`",
            );
        }
        if let Some(name) = &target.credential {
            if let Err(error) = policy.check_credential(name) {
                push(errors, format!("targets[{i}].credential"), error.to_string());
            }
        }
        if let Some(wave) = &target.wave {
            if !self.wave_names.contains(wave.as_str()) {
                push(errors, format!("targets[{i}].wave"), format!("no wave is named {wave:?}"));
            }
        }
    }
}

/// When a target goes through a real transport: every installer must be in
/// the content store already.
pub fn check_content<'a>(
    sha256s: impl IntoIterator<Item = &'a str>,
    content_dir: &std::path::Path,
    errors: &mut Vec<FieldError>,
) {
    for (i, sha256) in sha256s.into_iter().enumerate() {
        if content::is_sha256(sha256) && !content::path_of(content_dir, sha256).exists() {
            push(
                errors,
                format!("patches[{i}].sha256"),
                format!(
                    "no installer with this sha256 in the content store; upload it first (PUT /v1/content/{sha256})"
                ),
            );
        }
    }
}

/// Places each target in its wave: a target that names one goes there,
/// and counts against its size first; the others fill the waves in order.
pub struct WaveAssigner {
    index_of: BTreeMap<String, u32>,
    sizes: Vec<Option<u32>>,
    filled: Vec<u32>,
    cursor: usize,
    default_credential: Option<String>,
}

impl WaveAssigner {
    fn new(waves: &[WaveSpec], default_credential: Option<String>) -> Self {
        Self {
            index_of: waves.iter().enumerate().map(|(i, w)| (w.name.clone(), i as u32)).collect(),
            sizes: waves.iter().map(|w| w.size).collect(),
            filled: vec![0; waves.len()],
            cursor: 0,
            default_credential,
        }
    }

    /// The first pass: a target that names its wave takes its place.
    pub fn count_explicit(&mut self, target: &TargetRequest) {
        if let Some(wave) = target.wave.as_deref().and_then(|w| self.index_of.get(w)) {
            self.filled[*wave as usize] += 1;
        }
    }

    /// The second pass, in the targets' order: the store's target.
    pub fn assign(&mut self, target: TargetRequest) -> NewTarget {
        let wave = match target.wave.as_deref().and_then(|w| self.index_of.get(w)) {
            Some(wave) => *wave,
            None => {
                let cursor = &mut self.cursor;
                while *cursor + 1 < self.sizes.len()
                    && self.sizes[*cursor].is_some_and(|size| self.filled[*cursor] >= size)
                {
                    *cursor += 1;
                }
                self.filled[*cursor] += 1;
                *cursor as u32
            }
        };
        NewTarget {
            host: target.host,
            port: target.port,
            transport: target.transport,
            labels: target.labels,
            credential: target.credential.or_else(|| self.default_credential.clone()),
            wave,
        }
    }
}

/// A checked request as the store's rollout without its targets, its
/// targets as they were read, and what places them in their waves.
pub fn into_rollout<T>(request: CreateRollout<T>) -> (NewRollout, T, WaveAssigner) {
    let waves: Vec<WaveSpec> = if request.waves.is_empty() {
        vec![WaveSpec::new("all", None, 100.0)]
    } else {
        request
            .waves
            .iter()
            .map(|w| WaveSpec {
                require_approval: w.require_approval,
                promote_after_seconds: w.promote_after_seconds,
                min_success_percent: w.min_success_percent,
                ..WaveSpec::new(w.name.clone(), w.size, w.max_failure_percent)
            })
            .collect()
    };
    let assigner = WaveAssigner::new(&waves, request.credential);
    let new = NewRollout {
        name: request.name,
        concurrency: request.concurrency,
        timeout_seconds: request.timeout_seconds,
        waves,
        settings: RolloutSettings {
            heartbeat_seconds: request.heartbeat_seconds,
            reboot: request.reboot,
            max_tries: request.max_tries,
            retry_offline_for_seconds: request.retry_offline_for_seconds,
            reboot_timeout_seconds: request.reboot_timeout_seconds,
            keep_files: request.keep_files,
            relays: request.relays,
            relay_fallback: request.relay_fallback,
            schedule: Schedule {
                start_at: request.start_at,
                deadline: request.deadline,
                windows: request.windows,
                groups: Vec::new(),
            },
        },
        patches: request
            .patches
            .into_iter()
            .map(|p| NewPatch {
                name: p.name,
                kb: p.kb,
                file: p.file,
                sha256: p.sha256,
                size: p.size,
                installer: p.installer,
                arguments: p.arguments,
                success_codes: p.success_codes,
                reboot_codes: p.reboot_codes,
                timeout_seconds: p.timeout_seconds,
                detection: p.detection,
            })
            .collect(),
        targets: Vec::new(),
    };
    (new, request.targets, assigner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> CreateRollout {
        serde_json::from_value(json).unwrap()
    }

    fn policy() -> InputPolicy {
        InputPolicy {
            max_targets_per_rollout: 5,
            credential_names: BTreeSet::from(["linux".to_owned(), "windows-admin".to_owned()]),
            ..InputPolicy::default()
        }
    }

    fn check(json: serde_json::Value) -> Result<NewRollout, Problem> {
        validate(request(json), std::path::Path::new("/nonexistent"), &policy())
    }

    fn minimal() -> serde_json::Value {
        serde_json::json!({
            "name": "r",
            "patches": [{"name": "KB1", "file": "kb1.msu", "sha256": "a".repeat(64), "installer": "msu"}],
            "targets": [{"host": "h1"}, {"host": "h2"}, {"host": "h3"}],
        })
    }

    #[test]
    fn targets_fill_waves_in_order_and_by_name() {
        let mut json = minimal();
        json["waves"] = serde_json::json!([{"name": "canary", "size": 1}, {"name": "rest"}]);
        json["targets"][2]["wave"] = serde_json::json!("canary");
        let rollout = check(json).unwrap();
        let waves: Vec<u32> = rollout.targets.iter().map(|t| t.wave).collect();
        assert_eq!(waves, vec![1, 1, 0], "h3 fills the canary, the others go to the rest");
    }

    #[test]
    fn approval_and_promotion_settings_are_checked_and_kept() {
        let mut json = minimal();
        json["waves"] = serde_json::json!([
            {"name": "canary", "size": 1, "require_approval": true},
            {"name": "pilot", "size": 1, "promote_after_seconds": 3600, "min_success_percent": 90},
            {"name": "rest"},
        ]);
        let rollout = check(json.clone()).unwrap();
        assert!(rollout.waves[0].require_approval && rollout.waves[0].gated());
        assert_eq!(
            (rollout.waves[1].promote_after_seconds, rollout.waves[1].min_success_percent),
            (Some(3600), Some(90.0))
        );
        assert!(!rollout.waves[2].gated());
        json["waves"] = serde_json::json!([
            {"name": "a", "size": 1, "min_success_percent": 120},
            {"name": "b", "size": 1, "promote_after_seconds": 99_999_999},
            {"name": "c", "require_approval": true},
        ]);
        let problem = check(json).unwrap_err();
        let messages: Vec<String> = problem.errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
        assert_eq!(
            messages,
            vec![
                "waves[0].min_success_percent: must be between 0 and 100",
                "waves[0].min_success_percent: applies to automatic promotion only: set promote_after_seconds too \
                 (the soak time)",
                "waves[1].promote_after_seconds: automatic promotion needs min_success_percent (the share of the \
                 wave's targets that must have succeeded)",
                "waves[1].promote_after_seconds: must be at most 2592000 (30 days)",
                "waves[2]: the last wave has no next wave to approve or promote: remove require_approval and \
                 promote_after_seconds from it",
            ]
        );
    }

    #[test]
    fn every_wrong_field_is_named() {
        let mut json = minimal();
        json["targets"][1]["host"] = serde_json::json!("");
        json["targets"][2]["transport"] = serde_json::json!("telnet");
        json["targets"][0]["credential_ref"] = serde_json::json!("hunter2");
        json["targets"][1]["credential"] = serde_json::json!("nobody");
        json["patches"][0]["sha256"] = serde_json::json!("xyz");
        let problem = check(json).unwrap_err();
        let fields: Vec<&str> = problem.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "patches[0].sha256",
                "targets[0].credential_ref",
                "targets[1].host",
                "targets[1].credential",
                "targets[2].transport"
            ]
        );
        assert_eq!(problem.status, StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn targets_name_defined_credentials_and_never_references() {
        let mut json = minimal();
        json["targets"][0]["credential"] = serde_json::json!("linux");
        let rollout = check(json).unwrap();
        assert_eq!(rollout.targets[0].credential.as_deref(), Some("linux"));
        for reference in ["file:/etc/shadow", "env:FLEETPATCH__DATABASE__URL"] {
            let mut json = minimal();
            json["targets"][1]["credential_ref"] = serde_json::json!(reference);
            let problem = check(json).unwrap_err();
            assert_eq!(problem.errors[0].field, "targets[1].credential_ref");
            assert!(problem.errors[0].message.contains("ask an administrator to define a named credential"));
        }
        let mut json = minimal();
        json["credential"] = serde_json::json!("windows-admin");
        json["targets"][0]["credential"] = serde_json::json!("linux");
        let rollout = check(json).unwrap();
        let names: Vec<Option<&str>> = rollout.targets.iter().map(|t| t.credential.as_deref()).collect();
        assert_eq!(names, vec![Some("linux"), Some("windows-admin"), Some("windows-admin")], "the default fills in");
        let mut json = minimal();
        json["credential"] = serde_json::json!("hunter2:pa55");
        let problem = check(json).unwrap_err();
        assert_eq!(problem.errors[0].field, "credential");
        assert!(!problem.detail.contains("pa55"), "a non-name is not repeated: {}", problem.detail);
        let mut json = minimal();
        json["targets"][2]["credential"] = serde_json::json!("windows");
        let problem = check(json).unwrap_err();
        assert_eq!(problem.errors[0].field, "targets[2].credential");
        assert!(problem.errors[0].message.contains("defined: linux, windows-admin"), "{}", problem.detail);
    }

    #[test]
    fn an_unknown_credential_is_named_with_the_defined_ones() {
        use crate::api::{InputPolicy, UnknownCredential};
        let policy = InputPolicy { credential_names: ["linux".to_owned()].into(), ..InputPolicy::default() };
        assert!(policy.check_credential("linux").is_ok());
        let error = policy.check_credential("windows").unwrap_err();
        assert_eq!(error, UnknownCredential::Undefined { name: "windows".into(), defined: "linux".into() });
        assert!(error.to_string().starts_with("no credential is named \"windows\" (defined: linux)"), "{error}");
        let error = policy.check_credential("user:secret").unwrap_err();
        assert!(matches!(error, UnknownCredential::NotAName { .. }));
        assert!(!error.to_string().contains("user:"), "the value is not repeated: {error}");
    }

    #[test]
    fn the_rollout_size_limit_names_its_key() {
        let mut json = minimal();
        json["targets"] =
            serde_json::json!((0..6).map(|i| serde_json::json!({"host": format!("h{i}")})).collect::<Vec<_>>());
        let problem = check(json).unwrap_err();
        assert_eq!(problem.errors[0].field, "targets");
        assert!(problem.detail.contains("scheduler.max_targets_per_rollout"), "{}", problem.detail);
        let mut json = minimal();
        json["targets"] =
            serde_json::json!((0..5).map(|i| serde_json::json!({"host": format!("h{i}")})).collect::<Vec<_>>());
        assert!(check(json).is_ok());
    }

    #[test]
    fn nul_characters_are_refused_with_their_field() {
        let body = br#"{"name":"r","targets":[{"host":"h\u0000x","labels":{"a\u0000":"b"}}]}"#;
        let errors = nul_fields(body).expect("NUL found");
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["targets[0].host", "targets[0].labels.a\0"]);
        assert!(nul_fields(br#"{"name":"r\\u0000"}"#).is_none(), "an escaped backslash is no NUL");
        assert!(nul_fields(br#"{"name":"plain"}"#).is_none());
    }

    #[test]
    fn real_transports_need_their_installers_uploaded() {
        let mut json = minimal();
        json["targets"][0]["transport"] = serde_json::json!("ssh");
        let problem = check(json).unwrap_err();
        assert!(problem.detail.contains("PUT /v1/content/"), "{}", problem.detail);
    }

    #[test]
    fn the_openapi_document_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for path in [
            "/v1/rollouts",
            "/v1/rollouts/{id}",
            "/v1/rollouts/{id}/targets",
            "/v1/rollouts/{id}/pause",
            "/v1/rollouts/{id}/resume",
            "/v1/rollouts/{id}/abort",
            "/v1/rollouts/{id}/retry-failed",
            "/v1/rollouts/{id}/approve",
            "/v1/rollouts/{id}/report",
            "/v1/reports/{sha256}",
            "/v1/targets/{id}",
            "/v1/content/{sha256}",
            "/v1/audit",
            "/v1/dead-letters",
            "/v1/dead-letters/replay",
        ] {
            assert!(paths.contains_key(path), "openapi.json misses {path}");
        }
    }
}
