//! The deployment plan: the file a worker stages beside the agent
//! (`plan.json`) and the agent follows. It is plain JSON so an operator can
//! read it on the target.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Current plan format; the agent refuses plans of another version.
pub const PLAN_VERSION: u32 = 1;
/// File name of the plan in the staging directory.
pub const PLAN_FILE_NAME: &str = "plan.json";

/// How an installer is run silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstallerKind {
    /// Windows Installer package: `msiexec /i FILE /qn /norestart ARGS`.
    Msi,
    /// Windows Update standalone package: `wusa FILE /quiet /norestart ARGS`.
    Msu,
    /// Windows executable with its own silent switches: `FILE ARGS`.
    Exe,
    /// Debian package: `dpkg -i FILE`.
    Deb,
    /// RPM package: `rpm -U --replacepkgs FILE`.
    Rpm,
    /// Shell script run by `/bin/sh FILE ARGS` (or a `.bat`/`.cmd` on Windows).
    Script,
}

impl InstallerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Msi => "msi",
            Self::Msu => "msu",
            Self::Exe => "exe",
            Self::Deb => "deb",
            Self::Rpm => "rpm",
            Self::Script => "script",
        }
    }
}

/// How to tell whether a patch is already installed on a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Detection {
    /// Windows hotfix or update, found under the Uninstall or Component Based Servicing keys.
    Hotfix { kb: String },
    /// Debian package installed (at this version, when given), by `dpkg-query`.
    Dpkg {
        package: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    /// RPM package installed (at this version, when given), by `rpm -q`.
    Rpm {
        package: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
}

/// What to do after the last patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebootPolicy {
    /// Never reboot; report that a reboot is required.
    #[default]
    Never,
    /// Reboot when a patch said so (e.g. exit code 3010).
    IfRequired,
    /// Always reboot after the deployment.
    Always,
}

/// One patch as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanPatch {
    /// Position in the plan; reports name patches by it.
    pub index: u32,
    pub name: String,
    /// File name of the installer in the staging directory.
    pub file: String,
    /// Hex sha256 of the installer; the agent refuses to run a file that does not match.
    pub sha256: String,
    /// Size of the installer in bytes (what a download must reach).
    #[serde(default)]
    pub size: u64,
    /// Where the agent downloads the installer when the worker did not stage
    /// it: full URLs (`http[s]://relay:1073/v1/content/{sha256}`), tried in
    /// order. Empty: the installer is staged beside the plan as `file`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    pub installer: InstallerKind,
    /// Extra arguments (silent switches) for the installer.
    #[serde(default)]
    pub arguments: String,
    /// Exit codes that mean "installed".
    pub success_codes: Vec<i32>,
    /// Exit codes that mean "installed, reboot required" (e.g. 3010).
    pub reboot_codes: Vec<i32>,
    /// The installer is killed after this long.
    pub timeout_seconds: u32,
}

/// Everything the agent needs, staged as `plan.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentPlan {
    pub version: u32,
    /// Unique per target and attempt; names the agent service/unit and the staging directory.
    pub deployment_id: String,
    pub target_id: Uuid,
    /// The target's attempt this plan belongs to; signed into every request.
    #[serde(default)]
    pub attempt: u32,
    /// Base URL of the collector, e.g. `http://fleetpatch-collector:1072`
    /// or `https://…` (then [`DeploymentPlan::collector_ca_pem`] is needed).
    pub collector_url: String,
    /// PEM certificate(s) of the CA the collector's TLS certificate must
    /// chain to (from `worker.collector_ca_file`); the agent trusts nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collector_ca_pem: Option<String>,
    /// The target's own report token: the key its requests are signed with
    /// ([`crate::report_auth`]). It never leaves the target.
    pub token: String,
    pub heartbeat_seconds: u32,
    pub patches: Vec<PlanPatch>,
    pub reboot: RebootPolicy,
    /// The command that reboots the target, when the policy says so; the
    /// agent's own default (`--reboot-command`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_command: Option<String>,
    /// PEM certificate(s) of the CA an `https://` relay's certificate must
    /// chain to (from `worker.relay_ca_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_ca_pem: Option<String>,
    /// How long the agent keeps trying to download one installer from its
    /// sources (reconnecting and resuming where it stopped) before the patch
    /// fails.
    #[serde(default = "default_download_timeout_seconds")]
    pub download_timeout_seconds: u32,
    /// Keep the staged files after the run (for debugging).
    #[serde(default)]
    pub keep_files: bool,
}

/// How long an agent tries to download one installer, unless the plan says.
pub const DEFAULT_DOWNLOAD_TIMEOUT_SECONDS: u32 = 600;

fn default_download_timeout_seconds() -> u32 {
    DEFAULT_DOWNLOAD_TIMEOUT_SECONDS
}

/// Deployment id of a target's attempt: short enough for a Windows service
/// name (at most 256 characters) and a systemd unit name.
pub fn deployment_id(target_id: Uuid, attempt: u32) -> String {
    format!("fp-{}-{attempt}", target_id.simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_rules_read_as_documented() {
        let rule: Detection =
            serde_json::from_str(r#"{"kind":"dpkg","package":"openssl","version":"3.0.15-1"}"#).unwrap();
        assert_eq!(rule, Detection::Dpkg { package: "openssl".into(), version: Some("3.0.15-1".into()) });
        let err = serde_json::from_str::<Detection>(r#"{"kind":"msi","product":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `msi`"), "{err}");
    }

    #[test]
    fn deployment_ids_are_unique_per_attempt() {
        let id = Uuid::new_v4();
        assert_ne!(deployment_id(id, 1), deployment_id(id, 2));
        assert!(deployment_id(id, 1).len() < 64);
    }
}
