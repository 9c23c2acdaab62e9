//! [`SshOptions`]: how the `ssh` transport connects, trusts host keys and
//! stages, as read from the worker's configuration (`[transports.ssh]`).

use std::path::PathBuf;
use std::time::Duration;

use fleetpatch_runtime::ConfigError;
use serde::{Deserialize, Serialize};

/// How an unknown or changed host key is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostKeyPolicy {
    /// Only hosts whose key is in `known_hosts_file` are trusted; an unknown
    /// or changed key fails the step with `Error::HostKey`.
    #[default]
    Strict,
    /// An unknown host's key is recorded into `known_hosts_file` and trusted
    /// from then on; a **changed** key is still refused.
    TrustOnFirstUse,
}

/// Why a staging root is refused; the message follows the key or label
/// that holds it (`staging_root must be …`) and repeats the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StagingRootError {
    #[error("must be an absolute directory other than /, got {0:?}")]
    NotAbsolute(String),
    #[error("must be a plain path (no .., no newline), got {0:?}")]
    NotPlain(String),
}

/// Checks a staging root (the option, or a target's label): an absolute
/// plain directory other than `/`.
pub(crate) fn validate_staging_root(root: &str) -> Result<(), StagingRootError> {
    if !root.starts_with('/') || root.trim_end_matches('/').is_empty() {
        return Err(StagingRootError::NotAbsolute(root.to_owned()));
    }
    if root.contains(['\0', '\n']) || root.split('/').any(|part| part == "..") {
        return Err(StagingRootError::NotPlain(root.to_owned()));
    }
    Ok(())
}

/// Options of the `ssh` transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshOptions {
    /// Login user when the target's credential names none.
    pub default_user: String,
    /// Port when the target names none.
    pub port: u16,
    /// TCP connect, SSH handshake and login, together.
    pub connect_timeout_seconds: u64,
    /// One remote command, or one SFTP request without an answer.
    pub command_timeout_seconds: u64,
    pub host_key_policy: HostKeyPolicy,
    /// OpenSSH `known_hosts` file (plain or hashed entries, `[host]:port`
    /// for ports other than 22). Required: without it no host is trusted.
    pub known_hosts_file: Option<PathBuf>,
    /// Absolute directory on the target under which each deployment gets
    /// `<staging_root>/<deployment_id>` (mode 700).
    pub staging_root: String,
    /// Run privileged commands (package queries need none; starting and
    /// stopping the agent, removing its files do) through `sudo -n` when the
    /// login user is not root.
    pub use_sudo: bool,
    /// How long a connection is kept after a step for the next step to the
    /// same target (probe, stage and start of one job, and a prompt
    /// cleanup, then log in once); 0 logs in for every step.
    pub connection_reuse_seconds: u64,
}

impl Default for SshOptions {
    fn default() -> Self {
        Self {
            default_user: "root".into(),
            port: 22,
            connect_timeout_seconds: 10,
            command_timeout_seconds: 120,
            host_key_policy: HostKeyPolicy::Strict,
            known_hosts_file: None,
            staging_root: "/var/tmp/fleetpatch".into(),
            use_sudo: true,
            connection_reuse_seconds: 30,
        }
    }
}

impl SshOptions {
    /// Checks the options; the error names the key and what to set.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.default_user.is_empty() {
            return Err(ConfigError::invalid("default_user", "must not be empty"));
        }
        if self.port == 0 {
            return Err(ConfigError::out_of_range("port", 1, 65535));
        }
        if self.connect_timeout_seconds == 0 {
            return Err(ConfigError::too_small("connect_timeout_seconds", 1));
        }
        if self.command_timeout_seconds == 0 {
            return Err(ConfigError::too_small("command_timeout_seconds", 1));
        }
        if self.known_hosts_file.is_none() {
            return Err(ConfigError::invalid(
                "known_hosts_file",
                "must be set: the ssh transport trusts only host keys recorded there (use host_key_policy = \
                 \"trust_on_first_use\" to record new hosts into it)",
            ));
        }
        validate_staging_root(&self.staging_root)
            .map_err(|error| ConfigError::invalid("staging_root", error.to_string()))?;
        Ok(())
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_seconds)
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_seconds)
    }

    /// The staging root without a trailing slash.
    pub(crate) fn staging_root(&self) -> &str {
        self.staging_root.trim_end_matches('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_read_from_config_with_defaults() {
        let options: SshOptions = serde_json::from_str(
            r#"{"known_hosts_file":"/etc/fleetpatch/known_hosts","host_key_policy":"trust_on_first_use"}"#,
        )
        .unwrap();
        assert_eq!(options.port, 22);
        assert_eq!(options.default_user, "root");
        assert_eq!(options.staging_root, "/var/tmp/fleetpatch");
        assert!(options.use_sudo);
        assert_eq!(options.host_key_policy, HostKeyPolicy::TrustOnFirstUse);
        options.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let err = serde_json::from_str::<SshOptions>(r#"{"prot":22}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `prot`"), "{err}");
    }

    #[test]
    fn invalid_options_name_the_key() {
        let base = SshOptions { known_hosts_file: Some("/k".into()), ..SshOptions::default() };
        let cases = [
            (SshOptions { known_hosts_file: None, ..base.clone() }, "known_hosts_file"),
            (SshOptions { staging_root: "relative".into(), ..base.clone() }, "staging_root"),
            (SshOptions { staging_root: "/".into(), ..base.clone() }, "staging_root"),
            (SshOptions { staging_root: "/a/../etc".into(), ..base.clone() }, "staging_root"),
            (SshOptions { port: 0, ..base.clone() }, "port"),
            (SshOptions { command_timeout_seconds: 0, ..base.clone() }, "command_timeout_seconds"),
        ];
        for (options, key) in cases {
            let err = options.validate().unwrap_err();
            assert_eq!(err.field(), key);
            assert!(err.to_string().starts_with(key), "{err}");
        }
        let err = SshOptions { staging_root: "/a/../etc".into(), ..base }.validate().unwrap_err();
        assert_eq!(err.to_string(), "staging_root must be a plain path (no .., no newline), got \"/a/../etc\"");
    }
}
