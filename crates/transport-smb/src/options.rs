//! [`SmbTransportOptions`]: how the `smb` transport logs in, where it stages
//! and how it installs the agent service, as read from the worker's
//! configuration (`[smb]`).

use std::time::Duration;

use fleetpatch_runtime::ConfigError;
use fleetpatch_winproto::EncryptionPolicy;
use serde::{Deserialize, Serialize};

/// SMB3 encryption, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encryption {
    /// Encrypt when the server can (SMB 3.x); sign only otherwise.
    #[default]
    WhenOffered,
    /// Refuse servers that cannot encrypt.
    Required,
    /// Sign only.
    Disabled,
}

impl From<Encryption> for EncryptionPolicy {
    fn from(value: Encryption) -> Self {
        match value {
            Encryption::WhenOffered => EncryptionPolicy::WhenOffered,
            Encryption::Required => EncryptionPolicy::Required,
            Encryption::Disabled => EncryptionPolicy::Disabled,
        }
    }
}

/// The account the agent service runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceAccountChoice {
    /// `LocalSystem`, as psexec and PDQ Deploy do by default.
    #[default]
    LocalSystem,
    /// The account the worker logs in with (the target's credential); it
    /// needs the "log on as a service" right.
    Login,
}

/// Options of the `smb` transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmbTransportOptions {
    /// Port when the target names none.
    pub port: u16,
    /// TCP connect and each SMB request.
    pub timeout_seconds: u64,
    pub encryption: Encryption,
    /// The disk share the files are staged on (`C$`, `ADMIN$`, or a share
    /// of your own).
    pub share: String,
    /// The local directory that share serves on the target (`C:\` for
    /// `C$`, `C:\Windows` for `ADMIN$`): the service's command line needs
    /// local paths.
    pub share_path: String,
    /// Directory under the share in which each deployment gets
    /// `<staging_dir>\<deployment_id>`.
    pub staging_dir: String,
    /// The account the agent service runs as.
    pub service_account: ServiceAccountChoice,
    /// How long to wait for the agent service to stop (cleanup) and for a
    /// service marked for deletion to disappear.
    pub service_timeout_seconds: u64,
}

impl Default for SmbTransportOptions {
    fn default() -> Self {
        Self {
            port: 445,
            timeout_seconds: 30,
            encryption: Encryption::WhenOffered,
            share: "C$".into(),
            share_path: "C:\\".into(),
            staging_dir: "Windows\\Patches".into(),
            service_account: ServiceAccountChoice::LocalSystem,
            service_timeout_seconds: 30,
        }
    }
}

/// A path component or a share name a Windows server accepts.
pub(crate) fn is_plain_component(part: &str) -> bool {
    !part.is_empty()
        && part != "."
        && part != ".."
        && part.len() <= 240
        && !part.chars().any(|c| c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '/' | '\\' | '|' | '?' | '*'))
}

impl SmbTransportOptions {
    /// Checks the options; the error names the key and what to set.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.port == 0 {
            return Err(ConfigError::out_of_range("port", 1, 65535));
        }
        if self.timeout_seconds == 0 {
            return Err(ConfigError::too_small("timeout_seconds", 1));
        }
        if self.service_timeout_seconds == 0 {
            return Err(ConfigError::too_small("service_timeout_seconds", 1));
        }
        let share = self.share.trim_end_matches('$');
        if self.share.is_empty() || !is_plain_component(&self.share) || share.is_empty() {
            return Err(ConfigError::invalid(
                "share",
                format!("must be a share name such as C$ or ADMIN$, got {:?}", self.share),
            ));
        }
        if self.share.eq_ignore_ascii_case("IPC$") {
            return Err(ConfigError::invalid("share", "must be a disk share; IPC$ holds named pipes only"));
        }
        let local = self.share_path.as_bytes();
        let drive_rooted = local.len() >= 3 && local[0].is_ascii_alphabetic() && local[1] == b':' && local[2] == b'\\';
        if !drive_rooted || self.share_path.contains(['"', '\0', '\n', '/']) {
            return Err(ConfigError::invalid(
                "share_path",
                format!(
                    "must be the local directory the share serves on the target, such as C:\\ or C:\\Windows, got \
                     {:?}",
                    self.share_path
                ),
            ));
        }
        let parts: Vec<&str> = self.staging_dir.split('\\').filter(|p| !p.is_empty()).collect();
        if parts.is_empty() || !parts.iter().all(|p| is_plain_component(p)) || self.staging_dir.contains('/') {
            return Err(ConfigError::invalid(
                "staging_dir",
                format!(
                    "must be a relative directory under the share with \\ separators, such as Windows\\Patches, \
                     got {:?}",
                    self.staging_dir
                ),
            ));
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_seconds)
    }

    /// `staging_dir` without leading or trailing separators.
    pub fn staging_dir(&self) -> String {
        self.staging_dir.split('\\').filter(|p| !p.is_empty()).collect::<Vec<_>>().join("\\")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_stage_under_windows_patches() {
        let options = SmbTransportOptions::default();
        options.validate().unwrap();
        assert_eq!(options.staging_dir(), "Windows\\Patches");
        assert_eq!((options.share.as_str(), options.port), ("C$", 445));
    }

    #[test]
    fn bad_options_name_the_key() {
        let cases: Vec<(SmbTransportOptions, &str)> = vec![
            (SmbTransportOptions { port: 0, ..Default::default() }, "port"),
            (SmbTransportOptions { share: "IPC$".into(), ..Default::default() }, "share"),
            (SmbTransportOptions { share: "a\\b".into(), ..Default::default() }, "share"),
            (SmbTransportOptions { share_path: "/srv".into(), ..Default::default() }, "share_path"),
            (SmbTransportOptions { staging_dir: "..\\x".into(), ..Default::default() }, "staging_dir"),
            (SmbTransportOptions { staging_dir: "\\".into(), ..Default::default() }, "staging_dir"),
            (SmbTransportOptions { timeout_seconds: 0, ..Default::default() }, "timeout_seconds"),
        ];
        for (options, key) in cases {
            let error = options.validate().unwrap_err();
            assert_eq!(error.field(), key);
            assert!(error.to_string().starts_with(key), "{error}");
        }
        let error = SmbTransportOptions { share: "a\\b".into(), ..Default::default() }.validate().unwrap_err();
        assert_eq!(
            error.in_section("smb").to_string(),
            "smb.share must be a share name such as C$ or ADMIN$, got \"a\\\\b\""
        );
    }
}
