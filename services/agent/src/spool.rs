//! The durable report queue: every report is written here (and fsync'd)
//! before anyone tries to send it, and leaves only once the collector has
//! acknowledged it. A killed agent therefore loses no report it produced.
//!
//! Files (default beside the plan):
//!
//! * `spool.bin` — the unacknowledged reports, in `seq` order, each a
//!   length-delimited protobuf `AgentReport` (varint length, then the
//!   message). Appends are fsync'd. Acknowledged reports leave memory at
//!   once but the file only when it is compacted (temporary file, fsync,
//!   rename): after [`COMPACT_AFTER_REPORTS`] of them or
//!   [`COMPACT_AFTER_BYTES`], and when the spool is dropped with its files
//!   kept. A run that drains removes the files without compacting them, so
//!   acknowledging costs no disk write (it took four fsyncs and two renames
//!   each: an agent run of two patches on a Linux target flushed the disk
//!   27 times and renamed 11 files, now 11 and 3; issue 20). An
//!   agent killed between an acknowledgement and a compaction resends those
//!   reports when it starts again; the collector keeps one of each `seq`.
//!   A torn last record (agent killed mid-append) is dropped when the spool
//!   is opened.
//! * `spool.bin.state` — JSON: the highest `seq` ever assigned, the patches
//!   already finished and whether the final result was produced. It lets a
//!   restarted agent continue numbering after reports that were already
//!   acknowledged (the collector deduplicates by seq, so reusing one would
//!   silently lose the new report) and resume after the last finished patch.
//!
//! The spool never talks to the network; the reporter thread does.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use fleetpatch_proto::limits::{MAX_REPORTS_PER_BATCH, MAX_REPORT_BODY_BYTES};
use fleetpatch_proto::v1::{agent_report::Kind, AgentReport, PatchOutcome};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::{error, warn, Error};

/// What a restarted agent needs to know about an earlier run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolState {
    /// The deployment the spool belongs to; a spool is never replayed for another.
    #[serde(default)]
    pub deployment_id: String,
    /// Highest seq assigned so far (0: none).
    pub last_seq: u64,
    /// Patches finished in earlier runs, by plan index.
    #[serde(default)]
    pub finished: BTreeMap<u32, FinishedPatch>,
    /// The final result has been produced (and is spooled or acknowledged).
    #[serde(default)]
    pub final_reported: bool,
}

/// The part of a `PatchFinished` a resumed run needs for its final result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedPatch {
    pub exit_code: i32,
    /// `PatchOutcome` as its protobuf number.
    pub outcome: i32,
}

impl FinishedPatch {
    pub fn outcome(&self) -> PatchOutcome {
        PatchOutcome::try_from(self.outcome).unwrap_or(PatchOutcome::Unspecified)
    }
}

/// Acknowledged reports the spool file may hold before it is compacted.
pub const COMPACT_AFTER_REPORTS: usize = 256;
/// Bytes of acknowledged reports the spool file may hold before it is compacted.
pub const COMPACT_AFTER_BYTES: usize = 1 << 20;

/// The durable queue of unacknowledged reports.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    state_path: PathBuf,
    /// Append handle; `None` after a write error (reports then live in
    /// memory only, and the next rewrite tries to reopen the file).
    file: Option<File>,
    pending: VecDeque<AgentReport>,
    /// Acknowledged reports (and their bytes) the file still holds, until
    /// the next compaction.
    acknowledged_in_file: (usize, usize),
    state: SpoolState,
    /// This agent process: stamped on every report it appends (reports an
    /// earlier process left in the spool keep their own), so the collector
    /// tells a second run of the deployment from a resent report.
    instance: u64,
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { action, path, source }
}

/// A random, non-zero agent instance (0 means "an agent older than the
/// field" to the collector).
fn draw_instance() -> Result<u64, Error> {
    loop {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
        let instance = u64::from_le_bytes(bytes);
        if instance != 0 {
            return Ok(instance);
        }
    }
}

/// Size of one report inside a `ReportBatch` (field tag, length, message).
fn encoded_len_in_batch(report: &AgentReport) -> usize {
    let length = report.encoded_len();
    1 + prost::encoding::encoded_len_varint(length as u64) + length
}

impl Spool {
    /// Path of the state file that belongs to a spool file.
    pub fn state_path_for(spool_path: &Path) -> PathBuf {
        let mut name = spool_path.as_os_str().to_owned();
        name.push(".state");
        PathBuf::from(name)
    }

    /// Open (or create) the spool of `deployment_id` at `path`, recovering
    /// what an earlier run left. A spool of another deployment is refused:
    /// its reports would go out under this deployment's target and token.
    pub fn open(path: &Path, deployment_id: &str) -> Result<Self, Error> {
        let state_path = Self::state_path_for(path);
        let mut state = match std::fs::read(&state_path) {
            Ok(bytes) => serde_json::from_slice::<SpoolState>(&bytes)
                .map_err(|e| Error::Corrupt { path: state_path.clone(), reason: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SpoolState::default(),
            Err(e) => return Err(io_error("read the spool state", &state_path)(e)),
        };
        if state.deployment_id.is_empty() {
            state.deployment_id = deployment_id.to_owned();
        } else if state.deployment_id != deployment_id {
            return Err(Error::Corrupt {
                path: state_path,
                reason: format!(
                    "it belongs to deployment {:?}, not {deployment_id:?} (use another --spool)",
                    state.deployment_id
                ),
            });
        }

        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error("read the spool", path)(e)),
        };
        let (records, good_length) = decode_records(&bytes);
        let mut pending = VecDeque::with_capacity(records.len());
        for report in records {
            // The state is written after the spool, so finished reports still in
            // the spool may be newer than the state.
            state.last_seq = state.last_seq.max(report.seq);
            match &report.kind {
                Some(Kind::Finished(finished)) => {
                    state.finished.insert(
                        finished.patch_index,
                        FinishedPatch { exit_code: finished.exit_code, outcome: finished.outcome },
                    );
                }
                Some(Kind::Final(_)) => state.final_reported = true,
                _ => {}
            }
            pending.push_back(report);
        }
        let instance = draw_instance()?;
        let mut spool = Self {
            path: path.to_path_buf(),
            state_path,
            file: None,
            pending,
            acknowledged_in_file: (0, 0),
            state,
            instance,
        };
        if good_length < bytes.len() {
            warn!(
                "dropping a torn record at the end of the spool",
                path = path.display(),
                bytes = bytes.len() - good_length
            );
            spool.rewrite()?;
        } else {
            spool.file = Some(open_append(path)?);
        }
        Ok(spool)
    }

    /// Unacknowledged reports, oldest first.
    pub fn pending(&self) -> &VecDeque<AgentReport> {
        &self.pending
    }

    pub fn state(&self) -> &SpoolState {
        &self.state
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number this agent process stamps on its reports.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Number the report, stamp it, and make it durable. A disk error is
    /// logged and the report kept in memory: reporting must go on.
    pub fn append(&mut self, kind: Kind) -> u64 {
        self.state.last_seq += 1;
        let report = AgentReport {
            seq: self.state.last_seq,
            sent_at_unix_ms: now_unix_ms(),
            agent_instance: self.instance,
            kind: Some(kind),
        };
        let progress_changed = match &report.kind {
            Some(Kind::Finished(finished)) => {
                self.state.finished.insert(
                    finished.patch_index,
                    FinishedPatch { exit_code: finished.exit_code, outcome: finished.outcome },
                );
                true
            }
            Some(Kind::Final(_)) => {
                self.state.final_reported = true;
                true
            }
            _ => false,
        };
        if let Err(e) = self.append_to_file(&report) {
            error!("cannot write a report to the spool; keeping it in memory", path = self.path.display(), error = e);
            self.file = None;
        }
        if progress_changed {
            if let Err(e) = self.write_state() {
                error!("cannot write the spool state", path = self.state_path.display(), error = e);
            }
        }
        let seq = report.seq;
        self.pending.push_back(report);
        seq
    }

    fn append_to_file(&mut self, report: &AgentReport) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(open_append(&self.path).map_err(|e| std::io::Error::other(e.to_string()))?);
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(&report.encode_length_delimited_to_vec())?;
        file.sync_data()
    }

    /// The oldest reports that fit in one request: at most `max_reports`
    /// (and [`MAX_REPORTS_PER_BATCH`]) and at most [`MAX_REPORT_BODY_BYTES`]
    /// encoded. Never empty while reports are pending.
    pub fn next_batch(&self, max_reports: usize) -> Vec<AgentReport> {
        let max_reports = max_reports.clamp(1, MAX_REPORTS_PER_BATCH);
        let mut batch = Vec::new();
        let mut bytes = 0;
        for report in &self.pending {
            let size = encoded_len_in_batch(report);
            if batch.len() == max_reports || (!batch.is_empty() && bytes + size > MAX_REPORT_BODY_BYTES) {
                break;
            }
            bytes += size;
            batch.push(report.clone());
        }
        batch
    }

    /// Drop every pending report with `seq <= through`; the file is
    /// compacted once it holds [`COMPACT_AFTER_REPORTS`] acknowledged
    /// reports or [`COMPACT_AFTER_BYTES`] of them.
    pub fn remove_through(&mut self, through: u64) -> Result<(), Error> {
        let (mut reports, mut bytes) = self.acknowledged_in_file;
        while let Some(report) = self.pending.front().filter(|report| report.seq <= through) {
            let length = report.encoded_len();
            bytes += prost::encoding::encoded_len_varint(length as u64) + length;
            reports += 1;
            self.pending.pop_front();
        }
        self.acknowledged_in_file = (reports, bytes);
        if reports >= COMPACT_AFTER_REPORTS || bytes >= COMPACT_AFTER_BYTES {
            self.compact()?;
        }
        Ok(())
    }

    /// Acknowledged reports the file still holds, and their bytes.
    pub fn acknowledged_in_file(&self) -> (usize, usize) {
        self.acknowledged_in_file
    }

    /// Rewrite the file with the pending reports only.
    fn compact(&mut self) -> Result<(), Error> {
        // The state remembers the seq watermark before the reports that carry
        // it leave the spool.
        self.write_state()?;
        self.rewrite()?;
        self.acknowledged_in_file = (0, 0);
        Ok(())
    }

    /// Write the state file atomically.
    fn write_state(&self) -> Result<(), Error> {
        let text = serde_json::to_vec_pretty(&self.state).expect("the spool state always serializes");
        write_atomically(&self.state_path, &text)
    }

    /// Replace the spool file with the pending reports.
    fn rewrite(&mut self) -> Result<(), Error> {
        let mut bytes = Vec::new();
        for report in &self.pending {
            report.encode_length_delimited(&mut bytes).expect("a Vec grows as needed");
        }
        // Windows cannot rename over an open file.
        self.file = None;
        write_atomically(&self.path, &bytes)?;
        self.file = Some(open_append(&self.path)?);
        Ok(())
    }

    /// Remove the spool's files (after it drained).
    pub fn remove_files(&mut self) -> Result<(), Error> {
        self.file = None;
        // Nothing is left to compact when the spool is dropped.
        self.acknowledged_in_file = (0, 0);
        for path in [&self.path, &self.state_path] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", path)(e)),
            }
        }
        Ok(())
    }
}

impl Drop for Spool {
    /// An agent that ends with its spool kept (the collector unreachable:
    /// `drain` sends the rest later) leaves only what is unacknowledged.
    fn drop(&mut self) {
        if self.acknowledged_in_file.0 > 0 {
            if let Err(e) = self.compact() {
                warn!(
                    "cannot compact the spool; acknowledged reports will be sent again",
                    path = self.path.display(),
                    error = e
                );
            }
        }
    }
}

/// Decode length-delimited records; returns them and the length of the
/// well-formed prefix (a torn or garbled tail is left out).
pub fn decode_records(bytes: &[u8]) -> (Vec<AgentReport>, usize) {
    let mut records = Vec::new();
    let mut rest = bytes;
    let mut last_seq = 0;
    while !rest.is_empty() {
        let mut cursor = rest;
        match AgentReport::decode_length_delimited(&mut cursor) {
            // Records are appended in seq order; anything else is garbage.
            Ok(report) if report.seq > last_seq && report.kind.is_some() => {
                last_seq = report.seq;
                records.push(report);
                rest = cursor;
            }
            _ => break,
        }
    }
    (records, bytes.len() - rest.len())
}

fn open_append(path: &Path) -> Result<File, Error> {
    OpenOptions::new().create(true).append(true).open(path).map_err(io_error("open the spool", path))
}

/// Write `bytes` to `path` through a temporary file, fsync and rename, so a
/// crash leaves either the old or the new content.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, path)?;
        sync_parent_directory(path);
        Ok(())
    };
    write().map_err(io_error("write", path))
}

/// Make a rename durable. Only possible (and needed) on Unix.
fn sync_parent_directory(path: &Path) {
    #[cfg(unix)]
    if let Some(parent) = path.parent() {
        let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
        if let Ok(directory) = File::open(parent) {
            let _ = directory.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpatch_proto::v1::{FinalResult, Heartbeat, PatchFinished, PatchStarted};

    fn started(index: u32) -> Kind {
        Kind::Started(PatchStarted { patch_index: index })
    }

    #[test]
    fn reports_survive_a_reopen_in_order() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("spool.bin");
        let mut spool = Spool::open(&path, "fp-1").unwrap();
        assert_eq!(spool.append(started(0)), 1);
        assert_eq!(spool.append(Kind::Heartbeat(Heartbeat { patch_index: Some(0) })), 2);
        assert_eq!(spool.append(started(1)), 3);
        drop(spool);

        let spool = Spool::open(&path, "fp-1").unwrap();
        let seqs: Vec<u64> = spool.pending().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(spool.state().last_seq, 3);
    }

    #[test]
    fn each_process_stamps_its_own_instance_and_resent_reports_keep_theirs() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("spool.bin");
        let mut first = Spool::open(&path, "fp-1").unwrap();
        assert_ne!(first.instance(), 0, "0 is reserved for agents older than the field");
        first.append(started(0));
        let first_instance = first.instance();
        drop(first);

        let mut second = Spool::open(&path, "fp-1").unwrap();
        assert_ne!(second.instance(), first_instance, "a restarted agent is another run");
        second.append(started(1));
        let stamped: Vec<(u64, u64)> = second.pending().iter().map(|r| (r.seq, r.agent_instance)).collect();
        assert_eq!(stamped, [(1, first_instance), (2, second.instance())]);
    }

    #[test]
    fn acknowledged_reports_leave_but_their_seq_is_remembered() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("spool.bin");
        let mut spool = Spool::open(&path, "fp-1").unwrap();
        for index in 0..3 {
            spool.append(started(index));
        }
        spool.remove_through(3).unwrap();
        assert!(spool.pending().is_empty());
        assert_eq!(spool.acknowledged_in_file().0, 3, "acknowledging writes nothing");
        drop(spool);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "a spool dropped with its files is compacted");

        let mut spool = Spool::open(&path, "fp-1").unwrap();
        assert!(spool.pending().is_empty());
        assert_eq!(spool.append(started(3)), 4, "numbering continues after acknowledged reports");
    }

    #[test]
    fn a_killed_agent_resends_what_was_acknowledged_but_not_compacted() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("spool.bin");
        let mut spool = Spool::open(&path, "fp-1").unwrap();
        for index in 0..3 {
            spool.append(started(index));
        }
        spool.remove_through(2).unwrap();
        assert_eq!(spool.pending().iter().map(|r| r.seq).collect::<Vec<_>>(), [3]);
        // Killed: no drop, no compaction.
        std::mem::forget(spool);

        let mut spool = Spool::open(&path, "fp-1").unwrap();
        assert_eq!(spool.pending().iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3], "sent again, same seq");
        assert_eq!(spool.append(started(3)), 4);
    }

    #[test]
    fn the_file_is_compacted_after_enough_acknowledgements_and_never_after_its_removal() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("spool.bin");
        let mut spool = Spool::open(&path, "fp-1").unwrap();
        for index in 0..=COMPACT_AFTER_REPORTS as u32 {
            spool.append(started(index));
        }
        let in_file = || decode_records(&std::fs::read(&path).unwrap()).0.len();
        spool.remove_through(COMPACT_AFTER_REPORTS as u64 - 1).unwrap();
        assert_eq!(in_file(), COMPACT_AFTER_REPORTS + 1, "below the limit the file keeps them");
        spool.remove_through(COMPACT_AFTER_REPORTS as u64).unwrap();
        assert_eq!((in_file(), spool.acknowledged_in_file()), (1, (0, 0)), "compacted at the limit");
        assert_eq!(spool.state().last_seq, COMPACT_AFTER_REPORTS as u64 + 1);

        // A drained run removes its files; dropping the spool then writes nothing.
        spool.remove_through(COMPACT_AFTER_REPORTS as u64 + 1).unwrap();
        spool.remove_files().unwrap();
        drop(spool);
        assert!(!path.exists() && !Spool::state_path_for(&path).exists());
    }

    #[test]
    fn progress_is_recovered_from_state_and_spool() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("spool.bin");
        let mut spool = Spool::open(&path, "fp-1").unwrap();
        spool.append(Kind::Finished(PatchFinished {
            patch_index: 4,
            exit_code: 3010,
            outcome: PatchOutcome::InstalledRebootRequired as i32,
            output_tail: String::new(),
            duration_ms: 5,
        }));
        spool.remove_through(1).unwrap();
        spool.append(Kind::Final(FinalResult { success: true, reboot_required: true, message: String::new() }));
        drop(spool);
        let spool = Spool::open(&path, "fp-1").unwrap();
        assert!(spool.state().final_reported);
        assert_eq!(spool.state().finished[&4].outcome(), PatchOutcome::InstalledRebootRequired);
        drop(spool);

        // Without the state file, the spool alone still knows the final result and its seq.
        std::fs::remove_file(Spool::state_path_for(&path)).unwrap();
        let spool = Spool::open(&path, "fp-1").unwrap();
        assert!(spool.state().final_reported);
        assert_eq!(spool.state().last_seq, 2);
    }

    #[test]
    fn a_spool_of_another_deployment_is_refused() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("spool.bin");
        let mut spool = Spool::open(&path, "fp-1").unwrap();
        spool.append(Kind::Final(FinalResult { success: true, reboot_required: false, message: String::new() }));
        drop(spool);
        let error = Spool::open(&path, "fp-2").unwrap_err().to_string();
        assert!(error.contains("belongs to deployment \"fp-1\""), "{error}");
    }

    #[test]
    fn a_torn_tail_is_dropped() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("spool.bin");
        let mut spool = Spool::open(&path, "fp-1").unwrap();
        spool.append(started(0));
        spool.append(started(1));
        drop(spool);
        let length = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().append(true).open(&path).unwrap().write_all(&[0x40, 1, 2]).unwrap();

        let mut spool = Spool::open(&path, "fp-1").unwrap();
        assert_eq!(spool.pending().len(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), length);
        assert_eq!(spool.append(started(2)), 3);
    }

    #[test]
    fn batches_respect_count_and_size_limits() {
        let directory = tempfile::tempdir().unwrap();
        let mut spool = Spool::open(&directory.path().join("spool.bin"), "fp-1").unwrap();
        for index in 0..150 {
            spool.append(Kind::Finished(PatchFinished {
                patch_index: index,
                exit_code: 0,
                outcome: PatchOutcome::Installed as i32,
                output_tail: "x".repeat(2000),
                duration_ms: 1,
            }));
        }
        let batch = spool.next_batch(usize::MAX);
        let encoded = fleetpatch_proto::v1::ReportBatch { reports: batch.clone() }.encode_to_vec();
        assert!(encoded.len() <= MAX_REPORT_BODY_BYTES, "{}", encoded.len());
        assert!(batch.len() > 100 && batch.len() < 150, "{}", batch.len());
        assert_eq!(spool.next_batch(7).len(), 7);
        assert_eq!(spool.next_batch(0).len(), 1);
    }
}
