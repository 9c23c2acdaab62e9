//! What a finished installer means: exit code to [`PatchOutcome`], and the
//! bounded tail of its output.
//!
//! Pure functions and a small buffer, no I/O, so the rules are unit-tested
//! on every platform.

use fleetpatch_proto::limits::MAX_OUTPUT_TAIL_BYTES;
use fleetpatch_proto::plan::PlanPatch;
use fleetpatch_proto::v1::PatchOutcome;

/// Exit code reported when the installer was never started (checksum
/// mismatch, missing file, installer kind not runnable on this OS).
pub const EXIT_CODE_NOT_RUN: i32 = -1;

/// Map an installer's exit code to an outcome. A code listed both as a
/// success and a reboot code (plans often list 3010 in both) means
/// "installed, reboot required": the reboot must not be forgotten.
///
/// On Unix a process can only exit with 0..=255 (`exit 3010` in a script
/// yields 3010 & 0xff = 194), so there a plan code above 255 also
/// matches its low 8 bits: a plan written with Windows' 3010 still means
/// "reboot required" for a script that exits 3010. The reported exit code
/// stays the one observed.
pub fn classify_exit_code(patch: &PlanPatch, exit_code: i32) -> PatchOutcome {
    classify_exit_code_for(patch, exit_code, cfg!(unix))
}

/// [`classify_exit_code`] with the platform rule explicit, for tests.
pub fn classify_exit_code_for(patch: &PlanPatch, exit_code: i32, eight_bit_exit_codes: bool) -> PatchOutcome {
    let listed = |codes: &[i32]| {
        codes.iter().any(|&code| {
            code == exit_code
                || (eight_bit_exit_codes && code > 255 && (0..=255).contains(&exit_code) && code & 0xff == exit_code)
        })
    };
    if listed(&patch.reboot_codes) {
        PatchOutcome::InstalledRebootRequired
    } else if listed(&patch.success_codes) {
        PatchOutcome::Installed
    } else {
        PatchOutcome::Failed
    }
}

/// Whether an outcome counts as installed for the final result.
pub fn is_installed(outcome: PatchOutcome) -> bool {
    matches!(outcome, PatchOutcome::Installed | PatchOutcome::InstalledRebootRequired)
}

/// Keeps the last bytes written to it, at most a few times
/// [`MAX_OUTPUT_TAIL_BYTES`] in memory however much the installer prints.
#[derive(Debug, Default)]
pub struct OutputTail {
    bytes: Vec<u8>,
    /// Whether anything was dropped at the front.
    truncated: bool,
}

impl OutputTail {
    pub fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > 2 * MAX_OUTPUT_TAIL_BYTES {
            let excess = self.bytes.len() - MAX_OUTPUT_TAIL_BYTES;
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }

    /// The tail as valid UTF-8 of at most [`MAX_OUTPUT_TAIL_BYTES`] bytes,
    /// cut at the front on a character boundary.
    pub fn to_text(&self) -> String {
        tail_text(&self.bytes)
    }

    /// The bytes kept (at most twice [`MAX_OUTPUT_TAIL_BYTES`]).
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    pub fn was_truncated(&self) -> bool {
        self.truncated || self.bytes.len() > MAX_OUTPUT_TAIL_BYTES
    }
}

/// The last at most [`MAX_OUTPUT_TAIL_BYTES`] bytes of `bytes` as UTF-8.
/// Invalid sequences become U+FFFD; the cut is made after the conversion
/// so the result never exceeds the limit.
pub fn tail_text(bytes: &[u8]) -> String {
    // Convert a little more than the limit: lossy conversion can only grow
    // the text, so the final cut below still lands on the true tail.
    let start = bytes.len().saturating_sub(MAX_OUTPUT_TAIL_BYTES + 4);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let mut cut = text.len().saturating_sub(MAX_OUTPUT_TAIL_BYTES);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    text[cut..].to_owned()
}

/// Cut `text` at the back to at most `limit` bytes on a character boundary.
pub fn truncate_to(text: &mut String, limit: usize) {
    if text.len() > limit {
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpatch_proto::plan::InstallerKind;

    fn patch(success_codes: Vec<i32>, reboot_codes: Vec<i32>) -> PlanPatch {
        PlanPatch {
            index: 0,
            name: "p".into(),
            file: "p.msi".into(),
            sha256: "0".repeat(64),
            size: 0,
            sources: Vec::new(),
            installer: InstallerKind::Msi,
            arguments: String::new(),
            success_codes,
            reboot_codes,
            timeout_seconds: 60,
        }
    }

    #[test]
    fn exit_codes_map_to_outcomes() {
        let patch = patch(vec![0, 1641], vec![3010]);
        assert_eq!(classify_exit_code(&patch, 0), PatchOutcome::Installed);
        assert_eq!(classify_exit_code(&patch, 1641), PatchOutcome::Installed);
        assert_eq!(classify_exit_code(&patch, 3010), PatchOutcome::InstalledRebootRequired);
        assert_eq!(classify_exit_code(&patch, 7), PatchOutcome::Failed);
        assert_eq!(classify_exit_code(&patch, -1), PatchOutcome::Failed);
    }

    #[test]
    fn unix_exit_codes_match_the_low_byte_of_large_plan_codes() {
        let patch = patch(vec![0], vec![3010]);
        assert_eq!(classify_exit_code_for(&patch, 194, true), PatchOutcome::InstalledRebootRequired);
        assert_eq!(classify_exit_code_for(&patch, 194, false), PatchOutcome::Failed);
        assert_eq!(classify_exit_code_for(&patch, 3010, false), PatchOutcome::InstalledRebootRequired);
        // Negative (NTSTATUS-style) codes are Windows-only and never match a status byte.
        let patch = self::patch(vec![0], vec![-1_073_741_819]);
        assert_eq!(classify_exit_code_for(&patch, 5, true), PatchOutcome::Failed);
    }

    #[test]
    fn a_code_in_both_lists_requires_a_reboot() {
        let patch = patch(vec![0, 3010], vec![3010]);
        assert_eq!(classify_exit_code(&patch, 3010), PatchOutcome::InstalledRebootRequired);
    }

    #[test]
    fn only_installed_outcomes_count_as_success() {
        assert!(is_installed(PatchOutcome::Installed));
        assert!(is_installed(PatchOutcome::InstalledRebootRequired));
        for outcome in
            [PatchOutcome::Failed, PatchOutcome::TimedOut, PatchOutcome::ChecksumMismatch, PatchOutcome::Unspecified]
        {
            assert!(!is_installed(outcome));
        }
    }

    #[test]
    fn the_tail_keeps_the_end_and_stays_valid_utf8() {
        let mut tail = OutputTail::default();
        tail.push(b"start\n");
        assert_eq!(tail.to_text(), "start\n");
        assert!(!tail.was_truncated());

        // 3-byte characters, so a byte cut would land inside one.
        for _ in 0..10_000 {
            tail.push("€".as_bytes());
        }
        tail.push(b"END");
        let text = tail.to_text();
        assert!(text.len() <= MAX_OUTPUT_TAIL_BYTES);
        assert!(text.len() > MAX_OUTPUT_TAIL_BYTES - 4);
        assert!(text.ends_with("€END"));
        assert!(text.trim_end_matches("END").chars().all(|c| c == '€'));
        assert!(tail.was_truncated());
    }

    #[test]
    fn invalid_utf8_is_replaced_within_the_limit() {
        let bytes = vec![0xff; MAX_OUTPUT_TAIL_BYTES * 2];
        let text = tail_text(&bytes);
        assert!(text.len() <= MAX_OUTPUT_TAIL_BYTES);
        assert!(text.chars().all(|c| c == char::REPLACEMENT_CHARACTER));
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let mut text = "aé".repeat(10);
        truncate_to(&mut text, 4);
        assert_eq!(text, "aéa");
    }
}
