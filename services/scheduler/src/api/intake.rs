//! `POST /v1/rollouts` for a fleet of any size, with memory flat in its
//! number of targets: the body is spooled to an unnamed file in the content
//! directory as it arrives, then read in three passes, none of which holds
//! more than a chunk of targets.
//!
//! 1. Every field but the targets, with the targets only counted
//!    ([`TargetCount`]); unknown and malformed fields are refused as before.
//! 2. Each target checked ([`TargetRules`]) and, if it names its wave,
//!    counted against that wave ([`WaveAssigner::count_explicit`]).
//! 3. Each target placed in its wave and sent, [`CHUNK`] at a time, to the
//!    store's open transaction ([`fleetpatch_store::RolloutIntake`]) while
//!    the next chunk is parsed.
//!
//! Before, the scheduler held the body, the parsed request and the store's
//! targets at once: 311 MiB at 1,000,000 targets (README, "Performance").

use super::schema::{check_content, check_header, into_rollout, TargetCount, TargetRules, MAX_FIELD_ERRORS};
use super::*;
use futures_util::StreamExt;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};

/// Targets per chunk handed to the store (one PostgreSQL statement each).
pub(super) const CHUNK: usize = 10_000;
/// Read buffer of each pass over the spooled body.
const READ_BUFFER: usize = 256 * 1024;

/// Creates the rollout `body` describes ([`super::create`]'s rules, applied
/// as the body is read).
pub(crate) async fn create_streamed(state: &ApiState, body: Body) -> Result<fleetpatch_store::Rollout, Problem> {
    // Held until the rollout is created or refused: its spool is gone then.
    let _slot = state.creates.try_acquire().map_err(|_| {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            format!(
                "{MAX_CONCURRENT_CREATES} rollouts are being created at once, each spooling up to {} MiB to the \
                 scheduler's content directory; retry when one of them is done",
                MAX_ROLLOUT_BODY_BYTES >> 20
            ),
        )
    })?;
    let started = std::time::Instant::now();
    let file = spool(body, &state.content_dir, MAX_ROLLOUT_BODY_BYTES).await?;
    let spooled = started.elapsed();

    // Pass 1: the header.
    let (file, header) = blocking(file, |reader| {
        let deserializer = &mut serde_json::Deserializer::from_reader(reader);
        let header: CreateRollout<TargetCount> =
            serde_path_to_error::deserialize(&mut *deserializer).map_err(malformed)?;
        deserializer.end().map_err(|error| malformed_at(".".into(), error))?;
        Ok(header)
    })
    .await?;
    let count = header.targets.0;
    let read_header = started.elapsed();
    let mut errors = Vec::new();
    check_header(&header, count, &state.input, &mut errors)?;
    let rules = TargetRules::new(&header);
    let (new, _, mut assigner) = into_rollout(header);

    // Pass 2: every target checked; the explicitly placed ones counted.
    let policy = state.input.clone();
    let (file, (mut errors, needs_content, mut assigner)) = blocking(file, move |reader| {
        let mut needs_content = false;
        each_target(reader, |i, target| {
            if errors.len() <= MAX_FIELD_ERRORS {
                rules.check(i, &target, &policy, &mut errors);
            }
            needs_content |= target.transport != "sim";
            assigner.count_explicit(&target);
            Ok(())
        })?;
        Ok((errors, needs_content, assigner))
    })
    .await?;
    if needs_content {
        check_content(new.patches.iter().map(|p| p.sha256.as_str()), &state.content_dir, &mut errors);
    }
    if !errors.is_empty() {
        return Err(Problem::invalid(errors));
    }
    let checked = started.elapsed();

    // Pass 3: the targets placed and written, a chunk at a time.
    let mut intake = state.store.begin_rollout(new).await?;
    let (sender, chunks) = tokio::sync::mpsc::channel::<Vec<NewTarget>>(1);
    let parse = blocking(file, move |reader| {
        let mut chunk = Vec::with_capacity(CHUNK);
        each_target(reader, |_, target| {
            chunk.push(assigner.assign(target));
            if chunk.len() == CHUNK {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                sender.blocking_send(full).map_err(|_| Stopped)?;
            }
            Ok(())
        })?;
        if !chunk.is_empty() {
            sender.blocking_send(chunk).map_err(|_| Stopped.problem())?;
        }
        Ok(())
    });
    let write = async {
        // Owned here: a failed write drops it at once, which stops the parse.
        let mut chunks = chunks;
        while let Some(chunk) = chunks.recv().await {
            intake.add_targets(&chunk).await?;
        }
        Ok::<_, fleetpatch_store::Error>(())
    };
    let (parsed, written) = tokio::join!(parse, write);
    written?;
    parsed?;
    if intake.targets() != count {
        tracing::error!(counted = count, written = intake.targets(), "a rollout's body read differently twice");
        return Err(Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal error",
            "the request's targets were read differently in two passes; nothing was created",
        ));
    }
    let id = intake.commit().await?;
    state.nudge.notify_one();
    let ms = |at: std::time::Duration| at.as_millis() as u64;
    tracing::info!(
        rollout_id = %id,
        targets = count,
        spooled_ms = ms(spooled),
        header_ms = ms(read_header - spooled),
        checked_ms = ms(checked - read_header),
        written_ms = ms(started.elapsed() - checked),
        "rollout created"
    );
    Ok(state.store.rollout(id).await?)
}

/// Writes the body to an unnamed file (gone when closed, even after a
/// crash) in `dir`, refusing more than `limit` bytes, and refuses a body
/// with a NUL character in a string, naming each field.
pub(super) async fn spool(body: Body, dir: &std::path::Path, limit: usize) -> Result<File, Problem> {
    use tokio::io::AsyncWriteExt;
    let unavailable = |error: std::io::Error| {
        tracing::error!(error = %error, dir = %dir.display(), "spooling a rollout's body failed");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service unavailable",
            "the request could not be spooled to the scheduler's content directory; retry",
        )
    };
    let owned = dir.to_path_buf();
    let file = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&owned)?;
        tempfile::tempfile_in(owned)
    })
    .await
    .map_err(|error| unavailable(std::io::Error::other(error)))?
    .map_err(unavailable)?;
    let mut file = tokio::fs::File::from_std(file);
    let mut stream = body.into_data_stream();
    let mut received = 0usize;
    let mut nul = NulScan::default();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            Problem::new(StatusCode::BAD_REQUEST, "Bad request", format!("reading the request failed: {error}"))
        })?;
        received += chunk.len();
        if received > limit {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Content too large",
                format!(
                    "a rollout's body may hold at most {limit} bytes: split the rollout (each holds at most \
                     scheduler.max_targets_per_rollout targets)"
                ),
            ));
        }
        nul.feed(&chunk);
        file.write_all(&chunk).await.map_err(unavailable)?;
    }
    file.flush().await.map_err(unavailable)?;
    let mut file = file.into_std().await;
    if nul.found {
        // Rare, and refused whole: read back to name every such field.
        let mut body = Vec::with_capacity(received);
        file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_end(&mut body)).map_err(unavailable)?;
        if let Some(errors) = nul_fields(&body) {
            return Err(Problem::invalid(errors));
        }
    }
    Ok(file)
}

/// Finds the JSON escape of NUL (`\u0000`) across the chunks of a body.
#[derive(Default)]
struct NulScan {
    /// The last bytes of the chunks so far (at most one escape's length - 1).
    tail: Vec<u8>,
    found: bool,
}

impl NulScan {
    const ESCAPE: &'static [u8] = b"\\u0000";

    fn feed(&mut self, chunk: &[u8]) {
        if self.found {
            return;
        }
        let keep = Self::ESCAPE.len() - 1;
        let mut seam = std::mem::take(&mut self.tail);
        seam.extend_from_slice(&chunk[..chunk.len().min(keep)]);
        let contains = |bytes: &[u8]| bytes.windows(Self::ESCAPE.len()).any(|w| w == Self::ESCAPE);
        self.found = contains(&seam) || contains(chunk);
        let mut tail = seam;
        if chunk.len() >= keep {
            tail.clear();
            tail.extend_from_slice(&chunk[chunk.len() - keep..]);
        } else {
            let drop = tail.len().saturating_sub(keep);
            tail.drain(..drop);
        }
        self.tail = tail;
    }
}

/// One pass over the spooled body on a blocking thread: `read` gets a
/// buffered reader from its start; the file comes back for the next pass.
async fn blocking<T: Send + 'static>(
    file: File,
    read: impl FnOnce(&mut BufReader<&File>) -> Result<T, Problem> + Send + 'static,
) -> Result<(File, T), Problem> {
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        file.seek(SeekFrom::Start(0)).map_err(|error| {
            tracing::error!(error = %error, "rewinding a spooled rollout body failed");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Service unavailable",
                "reading the request back failed; retry",
            )
        })?;
        let value = read(&mut BufReader::with_capacity(READ_BUFFER, &file))?;
        Ok((file, value))
    })
    .await
    .map_err(|error| {
        tracing::error!(error = %error, "a pass over a rollout body panicked");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal error", "reading the request failed")
    })?
}

/// The store's transaction went away: the parse stops.
#[derive(Debug)]
struct Stopped;

impl Stopped {
    /// Not the answer the client sees: the store's own error is.
    fn problem(&self) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Service unavailable",
            "writing the rollout's targets failed; nothing was created, retry",
        )
    }
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("stopped: writing the targets failed")
    }
}

/// Calls `visit` with each target of the body, in order, parsed as the
/// API's [`TargetRequest`] (a malformed one is answered like any malformed
/// field, with its path). The other fields are skipped: pass 1 checked them.
fn each_target<R: Read>(
    reader: R,
    mut visit: impl FnMut(usize, TargetRequest) -> Result<(), Stopped>,
) -> Result<(), Problem> {
    let mut deserializer = serde_json::Deserializer::from_reader(reader);
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(&mut deserializer, &mut track);
    let mut stopped = false;
    let mut visit = |index, target| visit(index, target).inspect_err(|_| stopped = true);
    match (RolloutFields { visit: &mut visit }).deserialize(tracked) {
        Ok(()) => Ok(()),
        Err(_) if stopped => Err(Stopped.problem()),
        Err(error) => Err(malformed_at(track.path().to_string(), error)),
    }
}

/// The body's top-level object, seen for its `targets` only.
struct RolloutFields<'v, F> {
    visit: &'v mut F,
}

impl<'de, F: FnMut(usize, TargetRequest) -> Result<(), Stopped>> DeserializeSeed<'de> for RolloutFields<'_, F> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, F: FnMut(usize, TargetRequest) -> Result<(), Stopped>> Visitor<'de> for RolloutFields<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a rollout")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "targets" {
                map.next_value_seed(Targets { visit: &mut *self.visit })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// The `targets` list, one target at a time.
struct Targets<'v, F> {
    visit: &'v mut F,
}

impl<'de, F: FnMut(usize, TargetRequest) -> Result<(), Stopped>> DeserializeSeed<'de> for Targets<'_, F> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(usize, TargetRequest) -> Result<(), Stopped>> Visitor<'de> for Targets<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of targets")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while let Some(target) = seq.next_element::<TargetRequest>()? {
            (self.visit)(index, target).map_err(serde::de::Error::custom)?;
            index += 1;
        }
        Ok(())
    }
}

/// A body that is not a rollout: 400, naming the field.
fn malformed(error: serde_path_to_error::Error<serde_json::Error>) -> Problem {
    let field = error.path().to_string();
    malformed_at(field, error.into_inner())
}

fn malformed_at(field: String, error: serde_json::Error) -> Problem {
    let mut problem = Problem::new(StatusCode::BAD_REQUEST, "Malformed request", format!("{field}: {error}"));
    problem.errors.push(FieldError { field, message: error.to_string() });
    problem
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> bool {
        let mut nul = NulScan::default();
        for chunk in chunks {
            nul.feed(chunk);
        }
        nul.found
    }

    #[test]
    fn the_nul_escape_is_found_across_any_split_of_the_body() {
        let body = br#"{"name":"a\u0000b"}"#;
        for split in 0..=body.len() {
            assert!(scan(&[&body[..split], &body[split..]]), "split at {split}");
        }
        // One byte at a time: the seam spans several chunks.
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert!(scan(&bytes));
        assert!(!scan(&[br#"{"name":"a\u0001b"}"#]));
        assert!(!scan(&[br#"{"name":"\u000"#, br#"1"}"#]));
    }
}
