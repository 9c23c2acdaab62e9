//! What the probe and the verification scan read from a target's registry:
//! the Windows version and architecture, and which hotfixes are installed.
//!
//! A hotfix (`Detection::Hotfix { kb }`) counts as installed when one of
//! these holds, the places Windows Update, `wusa` and `Get-HotFix` record
//! it:
//! * `HKLM\SOFTWARE\Microsoft\Windows\CurrentVersion\Uninstall\<KB>` exists;
//! * `HKLM\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Hotfix\<KB>` exists
//!   (older releases);
//! * a package under `...\Component Based Servicing\Packages` is named
//!   `..._for_<KB>~...` and its `CurrentState` is 0x70 (Installed).

use std::collections::BTreeMap;

use fleetpatch_proto::plan::Detection;
use fleetpatch_transport::PatchProbe;
use fleetpatch_winproto::dcerpc::PipeIo;
use fleetpatch_winproto::{RegistryValue, RemoteRegistry, Result};

pub const CURRENT_VERSION: &str = "SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion";
pub const UNINSTALL: &str = "SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Uninstall";
pub const HOTFIX: &str = "SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion\\Hotfix";
pub const CBS_PACKAGES: &str = "SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Component Based Servicing\\Packages";
pub const ENVIRONMENT: &str = "SYSTEM\\CurrentControlSet\\Control\\Session Manager\\Environment";
pub const COMPUTER_NAME: &str = "SYSTEM\\CurrentControlSet\\Control\\ComputerName\\ComputerName";
/// Holds `ShutdownTime`.
pub const WINDOWS_CONTROL: &str = "SYSTEM\\CurrentControlSet\\Control\\Windows";
pub const PRODUCT_OPTIONS: &str = "SYSTEM\\CurrentControlSet\\Control\\ProductOptions";
/// `CurrentState` of an installed CBS package.
pub const CBS_INSTALLED: u32 = 0x70;

/// Windows facts from the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowsFacts {
    /// `10.0.19045.3570`, or `6.1.7601` on releases without the major/minor
    /// DWORDs.
    pub version: String,
    /// `x86_64`, `x86`, `aarch64`, or `unknown`.
    pub arch: String,
    pub details: BTreeMap<String, String>,
    /// `ShutdownTime` (the FILETIME Windows writes as it shuts down, in
    /// hex): it changes with every clean restart, so it tells a machine
    /// that rebooted from one that has not yet. `None` when absent.
    pub boot_id: Option<String>,
}

/// Maps `PROCESSOR_ARCHITECTURE` to the names the worker's agent binaries
/// are configured under.
pub fn arch_of(processor_architecture: &str) -> String {
    match processor_architecture.trim().to_ascii_uppercase().as_str() {
        "AMD64" | "EM64T" | "X64" => "x86_64".into(),
        "X86" => "x86".into(),
        "ARM64" => "aarch64".into(),
        "" => "unknown".into(),
        other => other.to_ascii_lowercase(),
    }
}

/// Reads the version, build and architecture.
pub async fn facts<P: PipeIo>(registry: &mut RemoteRegistry<P>) -> Result<WindowsFacts> {
    let mut details = BTreeMap::new();
    let major = registry.read_dword(CURRENT_VERSION, "CurrentMajorVersionNumber").await.ok().flatten();
    let minor = registry.read_dword(CURRENT_VERSION, "CurrentMinorVersionNumber").await.ok().flatten();
    let current_version = registry.read_string(CURRENT_VERSION, "CurrentVersion").await?;
    let build = match registry.read_string(CURRENT_VERSION, "CurrentBuildNumber").await? {
        Some(build) => Some(build),
        None => registry.read_string(CURRENT_VERSION, "CurrentBuild").await?,
    };
    let ubr = registry.read_dword(CURRENT_VERSION, "UBR").await.ok().flatten();
    let mut version = match (major, minor, &current_version) {
        (Some(major), Some(minor), _) => format!("{major}.{minor}"),
        (_, _, Some(current)) => current.clone(),
        _ => "unknown".into(),
    };
    if let Some(build) = &build {
        version.push('.');
        version.push_str(build);
        details.insert("build".into(), build.clone());
        if let Some(ubr) = ubr {
            version.push('.');
            version.push_str(&ubr.to_string());
            details.insert("ubr".into(), ubr.to_string());
        }
    }
    for (name, key) in [
        ("product_name", "ProductName"),
        ("display_version", "DisplayVersion"),
        ("edition", "EditionID"),
        ("installation_type", "InstallationType"),
    ] {
        if let Ok(Some(value)) = registry.read_string(CURRENT_VERSION, key).await {
            details.insert(name.into(), value);
        }
    }
    if let Ok(Some(product_type)) = registry.read_string(PRODUCT_OPTIONS, "ProductType").await {
        details.insert("product_type".into(), product_type);
    }
    if let Ok(Some(name)) = registry.read_string(COMPUTER_NAME, "ComputerName").await {
        details.insert("computer_name".into(), name);
    }
    let processor = registry.read_string(ENVIRONMENT, "PROCESSOR_ARCHITECTURE").await?.unwrap_or_default();
    if !processor.is_empty() {
        details.insert("processor_architecture".into(), processor.clone());
    }
    let boot_id = match registry.read_value(WINDOWS_CONTROL, "ShutdownTime").await {
        Ok(Some(RegistryValue::Binary(bytes))) if !bytes.is_empty() => Some(hex::encode(bytes)),
        Ok(Some(RegistryValue::Qword(value))) => Some(format!("{value:016x}")),
        _ => None,
    };
    Ok(WindowsFacts { version, arch: arch_of(&processor), details, boot_id })
}

/// `kb5031356`, `KB5031356` and `5031356` all become `KB5031356`.
pub fn normalize_kb(kb: &str) -> String {
    let trimmed = kb.trim();
    let digits = trimmed.strip_prefix("KB").or_else(|| trimmed.strip_prefix("kb")).unwrap_or(trimmed);
    format!("KB{}", digits.to_ascii_uppercase())
}

/// Whether a CBS package name belongs to `kb` (`Package_for_KB5031356~31bf...`,
/// `Package_1_for_KB5031356~...`, `Package_for_KB5031356_RTM~...`).
pub fn package_is_for(package: &str, kb: &str) -> bool {
    let upper = package.to_ascii_uppercase();
    let needle = format!("_FOR_{kb}");
    let mut start = 0;
    while let Some(found) = upper[start..].find(&needle) {
        let end = start + found + needle.len();
        match upper.as_bytes().get(end) {
            None | Some(b'~') | Some(b'_') => return true,
            _ => start = end,
        }
    }
    false
}

/// The outcome of checking the patches' detection rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detected {
    pub installed: Vec<u32>,
    pub missing: Vec<u32>,
    /// Rules that do not apply to Windows (dpkg, rpm): counted as missing.
    pub not_applicable: Vec<String>,
}

/// Checks every patch's detection rule.
pub async fn detect<P: PipeIo>(registry: &mut RemoteRegistry<P>, patches: &[PatchProbe]) -> Result<Detected> {
    let mut detected = Detected::default();
    let mut packages: Option<Vec<String>> = None;
    for patch in patches {
        let installed = match &patch.detection {
            Some(Detection::Hotfix { kb }) => {
                let kb = normalize_kb(kb);
                if registry.key_exists(&format!("{UNINSTALL}\\{kb}")).await?
                    || registry.key_exists(&format!("{HOTFIX}\\{kb}")).await?
                {
                    true
                } else {
                    if packages.is_none() {
                        packages = Some(registry.subkeys(CBS_PACKAGES).await?.unwrap_or_default());
                    }
                    let mut found = false;
                    for package in packages.iter().flatten().filter(|p| package_is_for(p, &kb)) {
                        let state = registry.read_dword(&format!("{CBS_PACKAGES}\\{package}"), "CurrentState").await;
                        if matches!(state, Ok(Some(CBS_INSTALLED))) {
                            found = true;
                            break;
                        }
                    }
                    found
                }
            }
            Some(other) => {
                detected.not_applicable.push(format!("{} ({other:?})", patch.name));
                false
            }
            None => false,
        };
        if installed {
            detected.installed.push(patch.index);
        } else {
            detected.missing.push(patch.index);
        }
    }
    Ok(detected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kb_numbers_normalize() {
        assert_eq!(normalize_kb("kb5031356"), "KB5031356");
        assert_eq!(normalize_kb(" 5031356 "), "KB5031356");
        assert_eq!(normalize_kb("KB5031356"), "KB5031356");
    }

    #[test]
    fn cbs_package_names_match_their_kb_only() {
        assert!(package_is_for("Package_for_KB5031356~31bf3856ad364e35~amd64~~19041.3570.1.6", "KB5031356"));
        assert!(package_is_for("Package_1_for_KB5031356~31bf3856ad364e35~amd64~~1.0", "KB5031356"));
        assert!(package_is_for("Package_for_KB5031356_RTM~31bf3856ad364e35~amd64~~1.0", "KB5031356"));
        assert!(package_is_for("package_for_kb5031356", "KB5031356"));
        assert!(!package_is_for("Package_for_KB50313567~31bf3856ad364e35", "KB5031356"));
        assert!(!package_is_for("Package_for_RollupFix~31bf3856ad364e35", "KB5031356"));
    }

    #[test]
    fn architectures_map_to_agent_binary_names() {
        assert_eq!(arch_of("AMD64"), "x86_64");
        assert_eq!(arch_of("x86"), "x86");
        assert_eq!(arch_of("ARM64"), "aarch64");
        assert_eq!(arch_of(""), "unknown");
    }
}
