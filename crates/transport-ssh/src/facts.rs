//! Reading what the probe and preflight scripts printed: `/etc/os-release`,
//! `uname`, admin rights, detection results, `df -Pk`. Parsers take the
//! target's output as untrusted text: bounded, never panicking, a line that
//! does not parse is skipped.

use std::collections::BTreeMap;

use fleetpatch_proto::plan::Detection;
use fleetpatch_transport::{PatchProbe, ProbeReport, VerifyReport};

use crate::shell::{self, DetectionQuery};
use crate::versions;

/// Parses `os-release` (`KEY=value`, values optionally quoted with shell
/// escapes) into a map.
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines().take(200) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
            continue;
        }
        map.insert(key.to_owned(), unquote(value));
    }
    map
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    let bytes = value.as_bytes();
    if bytes.len() >= 2 && (bytes[0] == b'"' || bytes[0] == b'\'') && bytes[bytes.len() - 1] == bytes[0] {
        let inner = &value[1..value.len() - 1];
        if bytes[0] == b'\'' {
            return inner.to_owned();
        }
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(ch) = chars.next() {
            if ch == '\\' {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            } else {
                out.push(ch);
            }
        }
        return out;
    }
    value.to_owned()
}

/// Admin rights as the `admin` section reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRights {
    Root,
    Sudo,
    /// sudo exists but asks for a password (no `NOPASSWD`).
    SudoNeedsPassword,
    None,
}

impl AdminRights {
    pub fn is_admin(self) -> bool {
        matches!(self, AdminRights::Root | AdminRights::Sudo)
    }
    fn parse(word: &str) -> Self {
        match word.trim() {
            "root" => AdminRights::Root,
            "sudo" => AdminRights::Sudo,
            "sudo-needs-password" => AdminRights::SudoNeedsPassword,
            _ => AdminRights::None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRights::Root => "root",
            AdminRights::Sudo => "sudo",
            AdminRights::SudoNeedsPassword => "sudo-needs-password",
            AdminRights::None => "none",
        }
    }
}

/// The detection queries for the patches whose rule applies on a Unix
/// target. A Windows hotfix rule, no rule, or a package name that is not a
/// valid package name mean "not installed" (the patch is deployed).
pub fn detection_queries(patches: &[PatchProbe]) -> Vec<(u32, DetectionQuery<'_>)> {
    patches
        .iter()
        .filter_map(|patch| match &patch.detection {
            Some(Detection::Dpkg { package, .. }) if shell::is_safe_package_name(package) => {
                Some((patch.index, DetectionQuery::Dpkg { package }))
            }
            Some(Detection::Rpm { package, .. }) if shell::is_safe_package_name(package) => {
                Some((patch.index, DetectionQuery::Rpm { package }))
            }
            Some(Detection::Dpkg { package, .. } | Detection::Rpm { package, .. }) => {
                tracing::warn!(patch = %patch.name, package = %package, "detection rule names an invalid package; treated as not installed");
                None
            }
            _ => None,
        })
        .collect()
}

/// Indexes of the patches the detection output says are installed.
pub fn installed_patches(patches: &[PatchProbe], output: &str) -> Vec<u32> {
    let sections = shell::sections(output);
    let mut installed = Vec::new();
    for patch in patches {
        let index = patch.index.to_string();
        let body = sections
            .iter()
            .find(|(header, _)| header.first() == Some(&"patch") && header.get(1) == Some(&index.as_str()))
            .map(|(_, body)| body.as_slice())
            .unwrap_or(&[]);
        let rc_ok = sections.iter().any(|(header, _)| header.as_slice() == ["rc", index.as_str(), "0"]);
        let found = rc_ok
            && match &patch.detection {
                Some(Detection::Dpkg { version, .. }) => versions::dpkg_installed(body, version.as_deref()),
                Some(Detection::Rpm { version, .. }) => versions::rpm_installed(body, version.as_deref()),
                _ => false,
            };
        if found {
            installed.push(patch.index);
        }
    }
    installed
}

/// The verification scan's result: a patch whose rule can be queried here
/// is installed or missing; one without (no rule, a Windows hotfix rule)
/// is unknown.
pub fn verify_report(patches: &[PatchProbe], output: &str) -> VerifyReport {
    let queried: Vec<u32> = detection_queries(patches).into_iter().map(|(index, _)| index).collect();
    let installed = installed_patches(patches, output);
    let (mut missing, mut unknown) = (Vec::new(), Vec::new());
    for index in patches.iter().map(|p| p.index).filter(|index| !installed.contains(index)) {
        if queried.contains(&index) {
            missing.push(index);
        } else {
            unknown.push(index);
        }
    }
    VerifyReport { installed, missing, unknown }
}

/// Fills a probe report from the facts sections.
pub fn probe_report(output: &str, patches: &[PatchProbe]) -> (ProbeReport, AdminRights) {
    let sections = shell::sections(output);
    let body = |name: &str| -> Vec<&str> {
        sections
            .iter()
            .find(|(header, _)| header.as_slice() == [name])
            .map(|(_, body)| body.clone())
            .unwrap_or_default()
    };
    let os_release = parse_os_release(&body("os-release").join("\n"));
    let uname = body("uname");
    let (kernel_name, arch, kernel_release) = (
        uname.first().copied().unwrap_or("").trim(),
        uname.get(1).copied().unwrap_or("").trim(),
        uname.get(2).copied().unwrap_or("").trim(),
    );
    let admin = AdminRights::parse(body("admin").first().copied().unwrap_or("none"));
    let os = os_release.get("NAME").cloned().unwrap_or_else(|| kernel_name.to_owned());
    let os_version = os_release
        .get("VERSION_ID")
        .or_else(|| os_release.get("VERSION"))
        .cloned()
        .unwrap_or_else(|| kernel_release.to_owned());
    let mut details = BTreeMap::new();
    for (key, name) in [("ID", "os_id"), ("PRETTY_NAME", "pretty_name"), ("VERSION_CODENAME", "codename")] {
        if let Some(value) = os_release.get(key) {
            details.insert(name.to_owned(), bounded(value));
        }
    }
    details.insert("kernel".into(), bounded(format!("{kernel_name} {kernel_release}").trim()));
    if let Some(hostname) = body("hostname").first() {
        details.insert("hostname".into(), bounded(hostname.trim()));
    }
    details.insert("admin_rights".into(), admin.as_str().into());
    let report = ProbeReport {
        os: bounded(&os),
        os_version: bounded(&os_version),
        arch: bounded(arch),
        is_admin: admin.is_admin(),
        installed: installed_patches(patches, output),
        details,
        boot_id: body("boot").first().map(|line| line.trim()).filter(|t| is_boot_id(t)).map(bounded),
    };
    (report, admin)
}

/// What the facts script prints as the boot's identity: the kernel's boot
/// id (`/proc/sys/kernel/random/boot_id`, 36 characters of hex digits and
/// dashes), or where there is none the boot time (digits). Anything else is
/// no identity at all.
pub(crate) fn is_boot_id(text: &str) -> bool {
    let time = !text.is_empty() && text.len() <= 20 && text.bytes().all(|b| b.is_ascii_digit());
    let id =
        text.len() == 36
            && text.bytes().enumerate().all(|(i, b)| {
                if [8, 13, 18, 23].contains(&i) {
                    b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
    time || id
}

fn bounded(value: &str) -> String {
    value.chars().take(256).collect()
}

/// `df -Pk` last line: available bytes, when it parses.
pub fn parse_df_available_bytes(line: &str) -> Option<u64> {
    // Filesystem 1024-blocks Used Available Capacity Mounted-on
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 6 {
        return None;
    }
    let available_kib: u64 = fields[fields.len() - 3].parse().ok()?;
    available_kib.checked_mul(1024)
}

/// Host and port of a collector URL (`http://host:port/...`; default ports
/// 80 and 443).
pub fn collector_host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().ok()?),
        None => (authority, default_port),
    };
    let valid = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    valid.then(|| (host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values_are_unquoted() {
        let map = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\n\
             ID=debian\n# comment\nHOME_URL='https://www.debian.org/'\nESCAPED=\"a \\\"b\\\"\"\nbad line\n",
        );
        assert_eq!(map["NAME"], "Debian GNU/Linux");
        assert_eq!(map["VERSION_ID"], "12");
        assert_eq!(map["ID"], "debian");
        assert_eq!(map["HOME_URL"], "https://www.debian.org/");
        assert_eq!(map["ESCAPED"], "a \"b\"");
        assert_eq!(map.len(), 6);
    }

    #[test]
    fn probe_output_becomes_a_report() {
        let patches = vec![
            PatchProbe {
                index: 0,
                name: "bash".into(),
                detection: Some(Detection::Dpkg { package: "bash".into(), version: None }),
            },
            PatchProbe {
                index: 1,
                name: "missing".into(),
                detection: Some(Detection::Dpkg { package: "nope".into(), version: None }),
            },
            PatchProbe { index: 2, name: "kb".into(), detection: Some(Detection::Hotfix { kb: "KB1".into() }) },
        ];
        let output = "@@fleetpatch os-release\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n\
                      @@fleetpatch uname\nLinux\nx86_64\n6.1.0\n@@fleetpatch hostname\nweb1\n\
                      @@fleetpatch boot\n1796323425\n\
                      @@fleetpatch uid\n0\n@@fleetpatch admin\nroot\n\
                      @@fleetpatch patch 0 dpkg\ninstall ok installed\t5.2.15-2+b2\n@@fleetpatch rc 0 0\n\
                      @@fleetpatch patch 1 dpkg\n@@fleetpatch rc 1 1\n";
        let (report, admin) = probe_report(output, &patches);
        assert_eq!(report.os, "Debian GNU/Linux");
        assert_eq!(report.os_version, "12");
        assert_eq!(report.arch, "x86_64");
        assert!(report.is_admin);
        assert_eq!(admin, AdminRights::Root);
        assert_eq!(report.installed, vec![0]);
        assert_eq!(report.details["hostname"], "web1");
        assert_eq!(detection_queries(&patches).len(), 2);
        assert_eq!(report.boot_id.as_deref(), Some("1796323425"), "the boot time from /proc/stat");
        // The scan judges the rules it can query; the hotfix rule is not one.
        let verify = verify_report(&patches, output);
        assert_eq!((verify.installed, verify.missing, verify.unknown), (vec![0], vec![1], vec![2]));
    }

    #[test]
    fn a_boot_line_that_is_neither_a_boot_id_nor_a_number_is_no_boot_id() {
        let (report, _) = probe_report("@@fleetpatch boot\nbtime? $(reboot)\n", &[]);
        assert_eq!(report.boot_id, None);
        let (report, _) = probe_report("@@fleetpatch boot\n94106349-d25b-4301-9455-4a307e2d14ac\n", &[]);
        assert_eq!(report.boot_id.as_deref(), Some("94106349-d25b-4301-9455-4a307e2d14ac"), "the kernel's boot id");
        for not_an_id in ["94106349-d25b-4301-9455-4a307e2d14a", "94106349xd25b-4301-9455-4a307e2d14ac", "", "12 34"] {
            assert!(!is_boot_id(not_an_id), "{not_an_id:?}");
        }
    }

    #[test]
    fn garbage_output_gives_an_empty_report_not_a_panic() {
        let (report, admin) = probe_report("\u{0}\u{1}@@fleetpatch\n@@fleetpatch patch\n@@fleetpatch rc x y\n", &[]);
        assert_eq!(report.os, "");
        assert!(!report.is_admin);
        assert_eq!(admin, AdminRights::None);
    }

    #[test]
    fn df_and_collector_urls_parse() {
        assert_eq!(parse_df_available_bytes("/dev/vda 263174212 14000000 80000000 16% /"), Some(80_000_000 * 1024));
        assert_eq!(parse_df_available_bytes("df: /x: No such file or directory"), None);
        assert_eq!(collector_host_port("http://collector:1072"), Some(("collector".into(), 1072)));
        assert_eq!(collector_host_port("https://c.example/x"), Some(("c.example".into(), 443)));
        assert_eq!(collector_host_port("http://[::1]:1072/"), Some(("::1".into(), 1072)));
        assert_eq!(collector_host_port("http://a;b:1/"), None);
        assert_eq!(collector_host_port("ftp://x"), None);
    }
}
