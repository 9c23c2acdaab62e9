//! Package version ordering as dpkg and rpm define it, and what the
//! detection queries printed.
//!
//! A detection rule with a version means "this version **or newer** is
//! installed": a target that already has a newer build must not get the
//! older installer (which would downgrade it). The comparison runs here, on
//! the worker, so it does not depend on the target's tools, and the target's
//! output is parsed with bounds (a line that does not parse is "not
//! installed", never a panic).

use std::cmp::Ordering;

/// Compares two Debian versions (`[epoch:]upstream[-revision]`) the way
/// `dpkg --compare-versions` does.
pub fn compare_dpkg(a: &str, b: &str) -> Ordering {
    let (a_epoch, a_upstream, a_revision) = split_dpkg(a);
    let (b_epoch, b_upstream, b_revision) = split_dpkg(b);
    a_epoch
        .cmp(&b_epoch)
        .then_with(|| dpkg_verrevcmp(a_upstream, b_upstream))
        .then_with(|| dpkg_verrevcmp(a_revision, b_revision))
}

fn split_dpkg(version: &str) -> (u64, &str, &str) {
    let version = version.trim();
    let (epoch, rest) = match version.split_once(':') {
        Some((epoch, rest)) if epoch.bytes().all(|b| b.is_ascii_digit()) => (epoch.parse().unwrap_or(u64::MAX), rest),
        _ => (0, version),
    };
    match rest.rsplit_once('-') {
        Some((upstream, revision)) => (epoch, upstream, revision),
        None => (epoch, rest, ""),
    }
}

/// dpkg's character order: `~` before everything (even the end), then the
/// end and digits, then letters, then everything else.
fn dpkg_order(ch: Option<u8>) -> i32 {
    match ch {
        None => 0,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(b'~') => -1,
        Some(c) => i32::from(c) + 256,
    }
}

fn dpkg_verrevcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let ac = dpkg_order(a.get(i).copied());
            let bc = dpkg_order(b.get(j).copied());
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// Compares two RPM version or release strings the way `rpmvercmp` does
/// (including `~` sorting before and `^` after the end).
pub fn rpmvercmp(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let separator = |c: u8| !c.is_ascii_alphanumeric() && c != b'~' && c != b'^';
    loop {
        while i < a.len() && separator(a[i]) {
            i += 1;
        }
        while j < b.len() && separator(b[j]) {
            j += 1;
        }
        let (ac, bc) = (a.get(i).copied(), b.get(j).copied());
        if ac == Some(b'~') || bc == Some(b'~') {
            if ac != Some(b'~') {
                return Ordering::Greater;
            }
            if bc != Some(b'~') {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        if ac == Some(b'^') || bc == Some(b'^') {
            if ac.is_none() {
                return Ordering::Less;
            }
            if bc.is_none() {
                return Ordering::Greater;
            }
            if ac != Some(b'^') {
                return Ordering::Greater;
            }
            if bc != Some(b'^') {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        if ac.is_none() || bc.is_none() {
            break;
        }
        let numeric = a[i].is_ascii_digit();
        let take = |s: &[u8], mut k: usize| {
            let start = k;
            while k < s.len() && if numeric { s[k].is_ascii_digit() } else { s[k].is_ascii_alphabetic() } {
                k += 1;
            }
            (start, k)
        };
        let (a_start, a_end) = take(a, i);
        let (b_start, b_end) = take(b, j);
        if b_start == b_end {
            // Segments of different kinds: numbers are newer than letters.
            return if numeric { Ordering::Greater } else { Ordering::Less };
        }
        let (mut sa, mut sb) = (&a[a_start..a_end], &b[b_start..b_end]);
        if numeric {
            while sa.first() == Some(&b'0') {
                sa = &sa[1..];
            }
            while sb.first() == Some(&b'0') {
                sb = &sb[1..];
            }
            let by_length = sa.len().cmp(&sb.len());
            if by_length != Ordering::Equal {
                return by_length;
            }
        }
        let by_bytes = sa.cmp(sb);
        if by_bytes != Ordering::Equal {
            return by_bytes;
        }
        i = a_end;
        j = b_end;
    }
    match (i >= a.len(), j >= b.len()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        _ => Ordering::Greater,
    }
}

/// Compares `[epoch:]version[-release]`; a release missing on either side is
/// not compared (a rule `1.2` matches any release of 1.2).
pub fn compare_rpm_evr(a: &str, b: &str) -> Ordering {
    fn split(evr: &str) -> (u64, &str, Option<&str>) {
        let evr = evr.trim();
        let (epoch, rest) = match evr.split_once(':') {
            Some((epoch, rest)) if epoch.bytes().all(|b| b.is_ascii_digit()) => (epoch.parse().unwrap_or(0), rest),
            _ => (0, evr),
        };
        match rest.rsplit_once('-') {
            Some((version, release)) => (epoch, version, Some(release)),
            None => (epoch, rest, None),
        }
    }
    let (a_epoch, a_version, a_release) = split(a);
    let (b_epoch, b_version, b_release) = split(b);
    a_epoch.cmp(&b_epoch).then_with(|| rpmvercmp(a_version, b_version)).then_with(|| match (a_release, b_release) {
        (Some(a), Some(b)) => rpmvercmp(a, b),
        _ => Ordering::Equal,
    })
}

/// Whether `dpkg-query -W -f='${Status}\t${Version}\n'` output says the
/// package is installed, at `wanted` or newer when given.
pub fn dpkg_installed(output: &[&str], wanted: Option<&str>) -> bool {
    output.iter().any(|line| {
        let Some((status, version)) = line.split_once('\t') else { return false };
        let installed = status.split_whitespace().nth(2) == Some("installed");
        installed && wanted.is_none_or(|wanted| compare_dpkg(version, wanted) != Ordering::Less)
    })
}

/// Whether `rpm -q --qf '%{EPOCH}:%{VERSION}-%{RELEASE}\n'` output (one line
/// per installed instance) has the package, at `wanted` or newer when given.
pub fn rpm_installed(output: &[&str], wanted: Option<&str>) -> bool {
    output.iter().any(|line| {
        let line = line.trim();
        let Some((epoch, _)) = line.split_once(':') else { return false };
        if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        wanted.is_none_or(|wanted| compare_rpm_evr(line, wanted) != Ordering::Less)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn dpkg_order_matches_dpkg_compare_versions() {
        let cases = [
            ("1.0", "1.0", Equal),
            ("1.0", "1.1", Less),
            ("1.10", "1.9", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0+deb12u1", Less),
            ("1:1.0", "2.0", Greater),
            ("5.2.15-2+b2", "5.2.15-2", Greater),
            ("5.2.15-2", "5.2.15-10", Less),
            ("3.0.15-1~deb12u1", "3.0.15-1", Less),
            ("1.0a", "1.0", Greater),
            ("1.0-1", "1.0", Greater),
            ("01", "1", Equal),
            ("1.0.0", "1.0", Greater),
        ];
        for (a, b, expected) in cases {
            assert_eq!(compare_dpkg(a, b), expected, "{a} vs {b}");
            assert_eq!(compare_dpkg(b, a), expected.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn dpkg_order_agrees_with_the_real_dpkg() {
        // The targets of the live tests are Debian (the CI machine itself), so dpkg is there.
        let versions = ["1.0", "1.0~rc1", "1.0+b1", "1:0.9", "1.0-1", "1.0-1~bpo", "1.0a", "2.0.0-0ubuntu1"];
        for a in versions {
            for b in versions {
                let lt = std::process::Command::new("dpkg")
                    .args(["--compare-versions", a, "lt", b])
                    .status()
                    .expect("dpkg is installed (Debian CI machine)")
                    .success();
                assert_eq!(compare_dpkg(a, b) == Less, lt, "{a} lt {b}");
            }
        }
    }

    #[test]
    fn rpm_order_matches_rpmvercmp() {
        let cases = [
            ("1.0", "1.0", Equal),
            ("1.0", "1.1", Less),
            ("1.10", "1.9", Greater),
            ("1.0~rc1", "1.0", Less),
            ("1.0^git1", "1.0", Greater),
            ("1.0^git1", "1.0.1", Less),
            ("1.0a", "1.0", Greater),
            ("1.0", "1.0.a", Less),
            ("2.0", "2a", Greater),
            ("1.05", "1.5", Equal),
            ("3.0.7", "3.0.7", Equal),
            ("el9", "el9_2", Less),
        ];
        for (a, b, expected) in cases {
            assert_eq!(rpmvercmp(a, b), expected, "{a} vs {b}");
            assert_eq!(rpmvercmp(b, a), expected.reverse(), "{b} vs {a}");
        }
        assert_eq!(compare_rpm_evr("1:3.0.7-27.el9", "3.0.7-28.el9"), Greater);
        assert_eq!(compare_rpm_evr("0:3.0.7-27.el9", "3.0.7-28.el9"), Less);
        assert_eq!(compare_rpm_evr("0:3.0.7-27.el9", "3.0.7"), Equal);
    }

    #[test]
    fn query_output_reads_as_installed_or_not() {
        assert!(dpkg_installed(&["install ok installed\t5.2.15-2+b2"], None));
        assert!(dpkg_installed(&["install ok installed\t5.2.15-2+b2"], Some("5.2.15-2")));
        assert!(!dpkg_installed(&["install ok installed\t5.2.15-2+b2"], Some("5.2.21-1")));
        assert!(!dpkg_installed(&["deinstall ok config-files\t1.0"], None));
        assert!(!dpkg_installed(&[], None));
        assert!(!dpkg_installed(&["garbage"], None));
        assert!(rpm_installed(&["0:3.0.7-27.el9"], Some("3.0.7-25.el9")));
        assert!(!rpm_installed(&["0:3.0.7-27.el9"], Some("3.0.8")));
        assert!(!rpm_installed(&["package openssl is not installed"], None));
        assert!(rpm_installed(&["0:1.0-1.i686", "0:1.0-1.x86_64"], None));
    }
}
