//! The rollout file (`rollout create -f rollout.yaml`): YAML (or JSON, its
//! subset) with exactly the schema of `POST /v1/rollouts`. The parser is the
//! scheduler's (`fleetpatch_scheduler::api::rollout_file`), which the
//! console's create page uses too, so the CLI, the console and the API can
//! never drift apart.
//!
//! Every error names the file, the line and the field
//! (`rollout.yaml:14:7: targets[2].port: invalid value ...`). Targets
//! imported from CSV files and inventories are merged here, each keeping
//! its origin, so that a refusal from the API about `targets[57]` can say
//! "hosts.csv line 12".

use std::collections::HashMap;
use std::path::Path;

use fleetpatch_scheduler::api::{CreateRollout, TargetRequest};

pub use fleetpatch_scheduler::api::rollout_file::{parse, InputError};

/// Reads a file the user named, with an error that says which.
pub fn read_input(path: &Path) -> Result<String, InputError> {
    std::fs::read_to_string(path)
        .map_err(|error| InputError::in_file(&path.display().to_string(), format!("cannot read the file: {error}")))
}

/// A target read from a CSV file or an inventory, with where it came from
/// (`hosts.csv line 4`).
#[derive(Debug, Clone)]
pub struct ImportedTarget {
    pub target: TargetRequest,
    pub origin: String,
}

/// A rollout request with the origin of each of its targets.
#[derive(Debug, Clone)]
pub struct RolloutInput {
    pub request: CreateRollout,
    /// `origins[i]` says where `request.targets[i]` was written.
    pub origins: Vec<String>,
}

impl RolloutInput {
    pub fn new(request: CreateRollout, file: &str) -> Self {
        let origins = (0..request.targets.len()).map(|i| format!("{file}, targets[{i}]")).collect();
        Self { request, origins }
    }

    /// Appends imported targets; a host that is already a target (same
    /// host, port and transport) is refused, naming both places.
    pub fn merge(&mut self, imported: Vec<ImportedTarget>) -> Result<(), InputError> {
        let key = |t: &TargetRequest| (t.host.to_ascii_lowercase(), t.port, t.transport.clone());
        let mut seen: HashMap<_, usize> = self.request.targets.iter().enumerate().map(|(i, t)| (key(t), i)).collect();
        for ImportedTarget { target, origin } in imported {
            if let Some(first) = seen.get(&key(&target)) {
                let (file, rest) = origin.split_once(" line ").unwrap_or((&origin, ""));
                return Err(InputError {
                    file: file.to_owned(),
                    line: rest.parse().ok(),
                    column: None,
                    field: None,
                    message: format!(
                        "host {:?} ({}) is already a target ({}); a host is deployed once per rollout",
                        target.host, target.transport, self.origins[*first]
                    ),
                });
            }
            seen.insert(key(&target), self.request.targets.len());
            self.request.targets.push(target);
            self.origins.push(origin);
        }
        Ok(())
    }

    /// Where a field of a refused request was written: `targets[57].host`
    /// → `hosts.csv line 12`.
    pub fn origin_of(&self, field: &str) -> Option<&str> {
        let index: usize = field.strip_prefix("targets[")?.split(']').next()?.parse().ok()?;
        self.origins.get(index).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "\
name: patch-tuesday
concurrency: 5
waves:
  - name: canary
    size: 1
    max_failure_percent: 0
patches:
  - name: KB5031356
    file: kb5031356.msu
    sha256: 1111111111111111111111111111111111111111111111111111111111111111
    installer: msu
targets:
  - host: sim-000
  - host: sim-001
    labels:
      sim.behaviour: fail_patch
";

    #[test]
    fn a_valid_file_gets_the_api_defaults() {
        let request = parse(VALID, "r.yaml", false).unwrap();
        assert_eq!(request.name, "patch-tuesday");
        assert_eq!(request.timeout_seconds, 600);
        assert_eq!(request.patches[0].success_codes, vec![0, 3010]);
        assert_eq!(request.targets[0].transport, "sim");
        assert_eq!(request.targets[1].labels["sim.behaviour"], "fail_patch");
        assert_eq!(request.waves[0].size, Some(1));
    }

    #[test]
    fn a_wrong_type_names_the_line_and_the_field() {
        let text = VALID.replace("  - host: sim-001\n", "  - host: sim-001\n    port: seventy\n");
        let error = parse(&text, "r.yaml", false).unwrap_err();
        assert_eq!(error.line, Some(15), "{error}");
        assert_eq!(error.field.as_deref(), Some("targets[1].port"));
        let shown = error.to_string();
        assert!(shown.starts_with("r.yaml:15:11: targets[1].port: invalid type: string \"seventy\""), "{shown}");
        assert!(!shown.contains(" at line "), "the location is not repeated: {shown}");
    }

    #[test]
    fn an_out_of_range_number_names_the_line_and_the_field() {
        let text = VALID.replace("concurrency: 5", "concurrency: -5");
        let error = parse(&text, "r.yaml", false).unwrap_err();
        assert_eq!((error.line, error.field.as_deref()), (Some(2), Some("concurrency")), "{error}");
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_line() {
        let text = VALID.replace("  - host: sim-000\n", "  - host: sim-000\n    hots: typo\n");
        let error = parse(&text, "r.yaml", false).unwrap_err();
        assert_eq!(error.line, Some(14), "{error}");
        assert_eq!(error.field.as_deref(), Some("targets[0].hots"), "{error}");
        assert!(error.message.starts_with("unknown field `hots`, expected one of `host`"), "{error}");
    }

    #[test]
    fn a_missing_field_is_named_with_its_parent() {
        let text = VALID.replace("    installer: msu\n", "");
        let error = parse(&text, "r.yaml", false).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("patches[0].installer"), "{error}");
        assert_eq!(error.message, "is required but missing");
        assert_eq!(error.line, Some(8), "{error}");
    }

    #[test]
    fn an_unknown_installer_lists_the_known_ones() {
        let text = VALID.replace("installer: msu", "installer: zip");
        let error = parse(&text, "r.yaml", false).unwrap_err();
        assert_eq!((error.line, error.field.as_deref()), (Some(11), Some("patches[0].installer")), "{error}");
        assert!(error.message.contains("unknown variant `zip`"), "{error}");
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let text = VALID.replace("  - host: sim-000\n", "  - host: [sim-000\n");
        let error = parse(&text, "r.yaml", false).unwrap_err();
        assert!(error.line.is_some(), "{error}");
        assert!(error.to_string().starts_with("r.yaml:"), "{error}");
    }

    #[test]
    fn targets_may_come_from_elsewhere() {
        let text = VALID.split("targets:").next().unwrap();
        let error = parse(text, "r.yaml", false).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("targets"), "{error}");
        let request = parse(text, "r.yaml", true).unwrap();
        assert!(request.targets.is_empty());
        assert_eq!(request.concurrency, 5);
    }

    #[test]
    fn json_is_yaml_too() {
        let text = include_str!("../../../examples/rollout-sim.json");
        let request = parse(text, "rollout-sim.json", false).unwrap();
        assert_eq!(request.targets.len(), 50);
    }

    #[test]
    fn every_example_rollout_parses() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut parsed = 0;
        for entry in std::fs::read_dir(&examples).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                parse(&text, &path.display().to_string(), false).unwrap_or_else(|e| panic!("{e}"));
                parsed += 1;
            }
        }
        assert!(parsed >= 2, "examples/ holds {parsed} rollout files");
    }

    #[test]
    fn imported_targets_keep_their_origin_and_duplicates_are_refused() {
        let mut input = RolloutInput::new(parse(VALID, "r.yaml", false).unwrap(), "r.yaml");
        let target = |host: &str| TargetRequest {
            host: host.into(),
            port: None,
            transport: "sim".into(),
            labels: Default::default(),
            credential: None,
            credential_ref: None,
            wave: None,
        };
        input.merge(vec![ImportedTarget { target: target("sim-100"), origin: "hosts.csv line 2".into() }]).unwrap();
        assert_eq!(input.origin_of("targets[2].host"), Some("hosts.csv line 2"));
        assert_eq!(input.origin_of("targets[0]"), Some("r.yaml, targets[0]"));
        assert_eq!(input.origin_of("patches[0].sha256"), None);
        let error = input
            .merge(vec![ImportedTarget { target: target("SIM-001"), origin: "hosts.csv line 3".into() }])
            .unwrap_err();
        assert_eq!(error.line, Some(3));
        assert!(error.to_string().contains("already a target (r.yaml, targets[1])"), "{error}");
    }
}
