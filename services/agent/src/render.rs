//! The temporary scripts: one per patch, holding that patch's one install
//! command, plus an overview (`deploypatches.sh` / `deploypatches.bat`) in
//! the spirit of the seed product's `deploypatches.bat`.
//!
//! Both renderings are pure text functions compiled on every platform, so
//! the Windows batch files are unit-tested on Linux. The agent writes the
//! rendering of the OS it runs on ([`Platform::CURRENT`]).
//!
//! Quoting rules: installer paths are quoted for the target shell (single
//! quotes for `/bin/sh`; double quotes with `%` doubled for `cmd.exe`,
//! where file names cannot contain `"`, which the plan validation also
//! refuses). The plan's `arguments` are the installer's silent switches,
//! written by the rollout author for that shell, and are inserted verbatim.

use std::path::Path;

use fleetpatch_proto::plan::{DeploymentPlan, InstallerKind, PlanPatch};

/// The shell a script is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// `/bin/sh` scripts, LF line endings.
    Unix,
    /// `cmd.exe` batch files, CRLF line endings.
    Windows,
}

impl Platform {
    #[cfg(windows)]
    pub const CURRENT: Platform = Platform::Windows;
    #[cfg(not(windows))]
    pub const CURRENT: Platform = Platform::Unix;

    /// File name of a patch's script.
    pub fn script_file_name(self, patch_index: u32) -> String {
        match self {
            Self::Unix => format!("fleetpatch-patch-{patch_index}.sh"),
            Self::Windows => format!("fleetpatch-patch-{patch_index}.bat"),
        }
    }

    /// File name of the overview script.
    pub fn overview_file_name(self) -> &'static str {
        match self {
            Self::Unix => "deploypatches.sh",
            Self::Windows => "deploypatches.bat",
        }
    }

    fn line_ending(self) -> &'static str {
        match self {
            Self::Unix => "\n",
            Self::Windows => "\r\n",
        }
    }
}

/// The installer kind cannot run on this platform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("installer kind {kind} needs {needs}; this agent runs on {platform}")]
pub struct UnsupportedInstaller {
    pub kind: &'static str,
    pub needs: &'static str,
    pub platform: &'static str,
}

fn unsupported(kind: InstallerKind, platform: Platform) -> UnsupportedInstaller {
    let (needs, platform) = match platform {
        Platform::Unix => ("Windows", "Unix"),
        Platform::Windows => ("Linux", "Windows"),
    };
    UnsupportedInstaller { kind: kind.as_str(), needs, platform }
}

/// Quote a path for `/bin/sh`: single quotes, embedded `'` as `'\''`.
pub fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Quote a path for a batch file: double quotes, `%` doubled so `cmd.exe`
/// does not expand it as a variable.
pub fn bat_quote(text: &str) -> String {
    format!("\"{}\"", text.replace('%', "%%"))
}

fn with_arguments(command: String, arguments: &str) -> String {
    let arguments = arguments.trim();
    if arguments.is_empty() {
        command
    } else {
        format!("{command} {arguments}")
    }
}

/// The install command for one patch on `platform`.
pub fn install_command(
    platform: Platform,
    kind: InstallerKind,
    installer: &str,
    arguments: &str,
) -> Result<String, UnsupportedInstaller> {
    match platform {
        Platform::Unix => {
            let file = sh_quote(installer);
            match kind {
                // Extra arguments for packages are package-manager options,
                // so they go before the file.
                InstallerKind::Deb => Ok(format!("{} {file}", with_arguments("dpkg -i".into(), arguments))),
                InstallerKind::Rpm => {
                    Ok(format!("{} {file}", with_arguments("rpm -U --replacepkgs".into(), arguments)))
                }
                InstallerKind::Script => Ok(with_arguments(format!("/bin/sh {file}"), arguments)),
                InstallerKind::Msi | InstallerKind::Msu | InstallerKind::Exe => Err(unsupported(kind, platform)),
            }
        }
        Platform::Windows => {
            let file = bat_quote(installer);
            match kind {
                InstallerKind::Msi => Ok(with_arguments(format!("msiexec /i {file} /qn /norestart"), arguments)),
                InstallerKind::Msu => Ok(with_arguments(format!("wusa {file} /quiet /norestart"), arguments)),
                InstallerKind::Exe => Ok(with_arguments(file, arguments)),
                InstallerKind::Script => Ok(cmd_c(&with_arguments(file, arguments))),
                InstallerKind::Deb | InstallerKind::Rpm => Err(unsupported(kind, platform)),
            }
        }
    }
}

/// Run a batch file (with its arguments) in a child `cmd.exe`, so its
/// `exit /b N` becomes the exit code of this line. Not `call "x.bat"`: Wine
/// 8 then reads back any non-zero N as 1. `/s` with the outer quotes makes
/// cmd.exe strip exactly those two, whatever quotes the line holds; `/d`
/// skips AutoRun commands.
fn cmd_c(line: &str) -> String {
    format!("cmd /d /s /c \"{line}\"")
}

/// Make a one-line comment safe: no line breaks, and no characters that
/// `cmd.exe` would act on even after `rem`.
fn comment_text(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() || matches!(c, '%' | '^' | '&' | '|' | '<' | '>') { '_' } else { c })
        .collect()
}

/// The temporary script for one patch: that patch's install command, with
/// stderr merged into stdout and the installer's exit code as its own.
pub fn patch_script(
    platform: Platform,
    plan: &DeploymentPlan,
    patch: &PlanPatch,
    installer: &Path,
) -> Result<String, UnsupportedInstaller> {
    let installer_text = installer.to_string_lossy();
    let command = install_command(platform, patch.installer, &installer_text, &patch.arguments)?;
    let header = format!(
        "fleetpatch-agent: deployment {}, patch {} {} ({})",
        comment_text(&plan.deployment_id),
        patch.index,
        comment_text(&patch.name),
        patch.installer.as_str()
    );
    let lines: Vec<String> = match platform {
        Platform::Unix => {
            let mut lines = vec!["#!/bin/sh".to_owned(), format!("# {header}"), "exec 2>&1".to_owned()];
            if patch.installer == InstallerKind::Deb {
                lines.push("DEBIAN_FRONTEND=noninteractive; export DEBIAN_FRONTEND".to_owned());
            }
            lines.push(command);
            lines
        }
        Platform::Windows => vec![
            "@echo off".to_owned(),
            format!("rem {header}"),
            format!("{command} 2>&1"),
            "exit /b %ERRORLEVEL%".to_owned(),
        ],
    };
    Ok(join_lines(platform, &lines))
}

/// The overview: what the agent is about to run, in order, as one script
/// an operator can read (or run by hand, without checksums or reports).
pub fn overview_script(platform: Platform, plan: &DeploymentPlan, staging_directory: &Path) -> String {
    let directory = staging_directory.to_string_lossy();
    let mut lines = Vec::new();
    let summary = format!(
        "fleetpatch-agent: deployment {}, {} patch(es), run one at a time, each through its own script;",
        comment_text(&plan.deployment_id),
        plan.patches.len()
    );
    let note = "the agent checks each installer's sha256 first and reports every step to the collector";
    match platform {
        Platform::Unix => {
            lines.push("#!/bin/sh".to_owned());
            lines.push(format!("# {summary}"));
            lines.push(format!("# {note}"));
            for patch in &plan.patches {
                lines.push(format!("# patch {}: {}", patch.index, comment_text(&patch.name)));
                let script = staging_directory.join(platform.script_file_name(patch.index));
                lines.push(format!("/bin/sh {}", sh_quote(&script.to_string_lossy())));
                lines.push(format!("echo \"patch {} exit code $?\"", patch.index));
            }
        }
        Platform::Windows => {
            lines.push("@echo off".to_owned());
            lines.push(format!("rem {summary}"));
            lines.push(format!("rem {note}"));
            for patch in &plan.patches {
                lines.push(format!("rem patch {}: {}", patch.index, comment_text(&patch.name)));
                let script =
                    format!("{}\\{}", directory.trim_end_matches('\\'), platform.script_file_name(patch.index));
                lines.push(cmd_c(&bat_quote(&script)));
                lines.push(format!("echo patch {} exit code %ERRORLEVEL%", patch.index));
            }
        }
    }
    join_lines(platform, &lines)
}

fn join_lines(platform: Platform, lines: &[String]) -> String {
    let ending = platform.line_ending();
    let mut text = lines.join(ending);
    text.push_str(ending);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpatch_proto::plan::RebootPolicy;
    use std::path::PathBuf;

    fn patch(index: u32, kind: InstallerKind, file: &str, arguments: &str) -> PlanPatch {
        PlanPatch {
            index,
            name: format!("KB50302{index} 100% & more"),
            file: file.into(),
            sha256: "0".repeat(64),
            size: 0,
            sources: Vec::new(),
            installer: kind,
            arguments: arguments.into(),
            success_codes: vec![0],
            reboot_codes: vec![3010],
            timeout_seconds: 600,
        }
    }

    fn plan(patches: Vec<PlanPatch>) -> DeploymentPlan {
        DeploymentPlan {
            version: 1,
            deployment_id: "fp-abc-1".into(),
            target_id: "6f1c1b8e-8f6f-4f53-9d55-3a3f5e0c2a11".parse().unwrap(),
            attempt: 1,
            collector_url: "http://collector:1072".into(),
            collector_ca_pem: None,
            token: "secret".into(),
            heartbeat_seconds: 30,
            patches,
            reboot: RebootPolicy::IfRequired,
            reboot_command: None,
            keep_files: false,
            relay_ca_pem: None,
            download_timeout_seconds: fleetpatch_proto::plan::DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
        }
    }

    #[test]
    fn windows_commands_follow_the_installer_conventions() {
        let file = r"C:\Windows\Patches\fp-abc-1\windows10.0-kb5030211-x64.msu";
        assert_eq!(
            install_command(Platform::Windows, InstallerKind::Msi, r"C:\P\app.msi", "REBOOT=ReallySuppress").unwrap(),
            r#"msiexec /i "C:\P\app.msi" /qn /norestart REBOOT=ReallySuppress"#
        );
        assert_eq!(
            install_command(Platform::Windows, InstallerKind::Msu, file, "").unwrap(),
            format!(r#"wusa "{file}" /quiet /norestart"#)
        );
        assert_eq!(
            install_command(Platform::Windows, InstallerKind::Exe, r"C:\P\setup.exe", "/S /v/qn").unwrap(),
            r#""C:\P\setup.exe" /S /v/qn"#
        );
        assert_eq!(
            install_command(Platform::Windows, InstallerKind::Script, r"C:\P\fix.cmd", "").unwrap(),
            r#"cmd /d /s /c ""C:\P\fix.cmd"""#
        );
        assert_eq!(
            install_command(Platform::Windows, InstallerKind::Script, r"C:\P Q\fix.bat", r#"/x "a b""#).unwrap(),
            r#"cmd /d /s /c ""C:\P Q\fix.bat" /x "a b"""#
        );
        assert_eq!(
            install_command(Platform::Windows, InstallerKind::Exe, r"C:\100%\setup.exe", "").unwrap(),
            r#""C:\100%%\setup.exe""#
        );
        let error = install_command(Platform::Windows, InstallerKind::Deb, r"C:\P\x.deb", "").unwrap_err();
        assert_eq!(error.to_string(), "installer kind deb needs Linux; this agent runs on Windows");
    }

    #[test]
    fn unix_commands_follow_the_installer_conventions() {
        assert_eq!(
            install_command(Platform::Unix, InstallerKind::Deb, "/tmp/fp/openssl.deb", "").unwrap(),
            "dpkg -i '/tmp/fp/openssl.deb'"
        );
        assert_eq!(
            install_command(Platform::Unix, InstallerKind::Deb, "/tmp/fp/openssl.deb", "--force-confold").unwrap(),
            "dpkg -i --force-confold '/tmp/fp/openssl.deb'"
        );
        assert_eq!(
            install_command(Platform::Unix, InstallerKind::Rpm, "/tmp/fp/x.rpm", "").unwrap(),
            "rpm -U --replacepkgs '/tmp/fp/x.rpm'"
        );
        assert_eq!(
            install_command(Platform::Unix, InstallerKind::Script, "/tmp/it's/fix.sh", "--quiet").unwrap(),
            r#"/bin/sh '/tmp/it'\''s/fix.sh' --quiet"#
        );
        let error = install_command(Platform::Unix, InstallerKind::Msi, "/tmp/x.msi", "").unwrap_err();
        assert_eq!(error.to_string(), "installer kind msi needs Windows; this agent runs on Unix");
    }

    #[test]
    fn a_windows_patch_script_is_a_crlf_batch_file() {
        let plan = plan(vec![patch(2, InstallerKind::Msu, "kb.msu", "")]);
        let script =
            patch_script(Platform::Windows, &plan, &plan.patches[0], &PathBuf::from(r"C:\Windows\Patches\kb.msu"))
                .unwrap();
        assert_eq!(
            script,
            "@echo off\r\n\
             rem fleetpatch-agent: deployment fp-abc-1, patch 2 KB503022 100_ _ more (msu)\r\n\
             wusa \"C:\\Windows\\Patches\\kb.msu\" /quiet /norestart 2>&1\r\n\
             exit /b %ERRORLEVEL%\r\n"
        );
        assert!(!script.replace("\r\n", "").contains('\n'), "bare LF in {script:?}");
    }

    #[test]
    fn a_unix_patch_script_merges_stderr() {
        let plan = plan(vec![patch(0, InstallerKind::Deb, "a.deb", "")]);
        let script = patch_script(Platform::Unix, &plan, &plan.patches[0], Path::new("/srv/fp/a.deb")).unwrap();
        assert_eq!(
            script,
            "#!/bin/sh\n\
             # fleetpatch-agent: deployment fp-abc-1, patch 0 KB503020 100_ _ more (deb)\n\
             exec 2>&1\n\
             DEBIAN_FRONTEND=noninteractive; export DEBIAN_FRONTEND\n\
             dpkg -i '/srv/fp/a.deb'\n"
        );
    }

    #[test]
    fn the_windows_overview_lists_every_patch_script() {
        let plan = plan(vec![
            patch(0, InstallerKind::Msi, "a.msi", "/l*v a.log"),
            patch(1, InstallerKind::Exe, "b.exe", "/S"),
        ]);
        let overview = overview_script(Platform::Windows, &plan, Path::new(r"C:\Windows\Patches\fp-abc-1\"));
        let lines: Vec<&str> = overview.split("\r\n").collect();
        assert_eq!(lines[0], "@echo off");
        assert!(
            lines.contains(&r#"cmd /d /s /c ""C:\Windows\Patches\fp-abc-1\fleetpatch-patch-0.bat"""#),
            "{overview}"
        );
        assert!(
            lines.contains(&r#"cmd /d /s /c ""C:\Windows\Patches\fp-abc-1\fleetpatch-patch-1.bat"""#),
            "{overview}"
        );
        assert!(lines.contains(&"echo patch 1 exit code %ERRORLEVEL%"), "{overview}");
        assert!(overview.ends_with("\r\n"));
        assert!(!overview.replace("\r\n", "").contains('\n'));
        assert_eq!(Platform::Windows.overview_file_name(), "deploypatches.bat");
    }
}
