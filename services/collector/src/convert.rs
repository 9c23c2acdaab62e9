//! An agent's report as the wire carries it (`v1::AgentReport`) turned into
//! what the store records, every bad field refused by name.

use chrono::{TimeZone, Utc};
use fleetpatch_proto::limits::{MAX_MESSAGE_BYTES, MAX_OUTPUT_TAIL_BYTES};
use fleetpatch_proto::v1::{self, agent_report::Kind};
use fleetpatch_store::{AgentInstance, IncomingReport, PatchOutcomeKind, ReportKind};
use uuid::Uuid;

pub(crate) fn tail(text: String, limit: usize) -> String {
    if text.len() <= limit {
        return text;
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

/// Why a report of a batch is refused (400); names the report by its index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InvalidReport {
    #[error("reports[{index}].seq must be at least 1")]
    ZeroSeq { index: usize },
    #[error("reports[{index}].seq {seq} is too large")]
    SeqTooLarge { index: usize, seq: u64 },
    #[error("reports[{index}] has no kind (started, finished, heartbeat or final)")]
    NoKind { index: usize },
    #[error("reports[{index}].finished.outcome {outcome} is not a known outcome")]
    UnknownOutcome { index: usize, outcome: i32 },
}

pub(crate) fn convert(
    target_id: Uuid,
    attempt: u32,
    index: usize,
    report: v1::AgentReport,
) -> Result<IncomingReport, InvalidReport> {
    if report.seq == 0 {
        return Err(InvalidReport::ZeroSeq { index });
    }
    if report.seq > i64::MAX as u64 {
        return Err(InvalidReport::SeqTooLarge { index, seq: report.seq });
    }
    let kind = match report.kind {
        None => return Err(InvalidReport::NoKind { index }),
        Some(Kind::Started(started)) => ReportKind::Started { patch_index: started.patch_index },
        Some(Kind::Heartbeat(beat)) => ReportKind::Heartbeat { patch_index: beat.patch_index },
        Some(Kind::Finished(finished)) => {
            let outcome = match v1::PatchOutcome::try_from(finished.outcome) {
                Ok(v1::PatchOutcome::Installed) => PatchOutcomeKind::Installed,
                Ok(v1::PatchOutcome::InstalledRebootRequired) => PatchOutcomeKind::InstalledRebootRequired,
                Ok(v1::PatchOutcome::Failed) => PatchOutcomeKind::Failed,
                Ok(v1::PatchOutcome::TimedOut) => PatchOutcomeKind::TimedOut,
                Ok(v1::PatchOutcome::ChecksumMismatch) => PatchOutcomeKind::ChecksumMismatch,
                _ => return Err(InvalidReport::UnknownOutcome { index, outcome: finished.outcome }),
            };
            ReportKind::Finished {
                patch_index: finished.patch_index,
                exit_code: finished.exit_code,
                outcome,
                output_tail: tail(finished.output_tail, MAX_OUTPUT_TAIL_BYTES),
            }
        }
        Some(Kind::Final(result)) => ReportKind::Final {
            success: result.success,
            reboot_required: result.reboot_required,
            message: tail(result.message, MAX_MESSAGE_BYTES),
        },
    };
    let sent_at = Utc.timestamp_millis_opt(report.sent_at_unix_ms).single();
    Ok(IncomingReport {
        target_id,
        attempt,
        agent_instance: AgentInstance(report.agent_instance),
        seq: report.seq,
        sent_at,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_end_on_a_char_boundary() {
        assert_eq!(tail("héllo".into(), 3), "llo");
        assert_eq!(tail("aé".into(), 2), "é");
        assert_eq!(tail("ok".into(), 10), "ok");
    }

    #[test]
    fn reports_without_a_kind_or_seq_are_refused_by_name() {
        let id = Uuid::new_v4();
        let err = convert(id, 1, 3, v1::AgentReport { seq: 0, sent_at_unix_ms: 0, agent_instance: 0, kind: None })
            .unwrap_err();
        assert_eq!(err, InvalidReport::ZeroSeq { index: 3 });
        assert!(err.to_string().contains("reports[3].seq"), "{err}");
        let err = convert(id, 1, 0, v1::AgentReport { seq: 1, sent_at_unix_ms: 0, agent_instance: 0, kind: None })
            .unwrap_err();
        assert!(err.to_string().contains("no kind"), "{err}");
    }
}
