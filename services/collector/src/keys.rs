//! The reads of targets' signing-key rows for the requests whose key is
//! not in the cache, gathered: while one read is in flight, the misses that
//! arrive meanwhile wait for the next, which takes them all in one
//! statement. A look-up alone waits for nothing; a rollout's agents that
//! all start at once (their first requests all miss) share a few reads
//! instead of one round trip each (issue 20: one look-up per target and
//! attempt was 10–13 % of the collector's CPU in the paced bench).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fleetpatch_store::{ReportIntake, TokenInfo};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most targets one read takes.
const MOST_PER_READ: usize = 500;

/// Why a look-up has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ReadFailed {
    #[error(transparent)]
    Store(Arc<fleetpatch_store::Error>),
    #[error("the collector's key reader has stopped (shutting down)")]
    Stopped,
}

/// What a read answers each of its waiters.
type Answer = Result<Option<TokenInfo>, ReadFailed>;

/// A handle on the reading task; cheap to clone.
#[derive(Clone)]
pub(crate) struct KeyReader {
    requests: mpsc::UnboundedSender<(Uuid, oneshot::Sender<Answer>)>,
    /// Reads of the store so far (what the tests check the gathering by).
    #[cfg_attr(not(test), allow(dead_code))]
    reads: Arc<AtomicU64>,
}

impl KeyReader {
    /// Starts the task that reads for this handle (it ends when every
    /// handle is gone).
    pub(crate) fn start(intake: ReportIntake) -> Self {
        let (requests, receiver) = mpsc::unbounded_channel();
        let reads = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(intake, receiver, reads.clone()));
        Self { requests, reads }
    }

    /// How many reads of the store answered the look-ups so far.
    #[cfg(test)]
    fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// `target`'s row, read with the other misses waiting now.
    pub(crate) async fn read(&self, target: Uuid) -> Answer {
        let (reply, answer) = oneshot::channel();
        if self.requests.send((target, reply)).is_err() {
            return Err(ReadFailed::Stopped);
        }
        answer.await.unwrap_or(Err(ReadFailed::Stopped))
    }
}

async fn run(
    intake: ReportIntake,
    mut receiver: mpsc::UnboundedReceiver<(Uuid, oneshot::Sender<Answer>)>,
    reads: Arc<AtomicU64>,
) {
    let mut waiting: Vec<(Uuid, oneshot::Sender<Answer>)> = Vec::new();
    while receiver.recv_many(&mut waiting, MOST_PER_READ).await > 0 {
        reads.fetch_add(1, Ordering::Relaxed);
        let mut ids: Vec<Uuid> = waiting.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        metrics::histogram!("fleetpatch_collector_key_read_targets").record(ids.len() as f64);
        match intake.token_infos(&ids).await {
            Ok(infos) => {
                for (id, reply) in waiting.drain(..) {
                    let _ = reply.send(Ok(infos.get(&id).cloned()));
                }
            }
            Err(error) => {
                let error = ReadFailed::Store(Arc::new(error));
                for (_, reply) in waiting.drain(..) {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetpatch_proto::state::TargetState;
    use fleetpatch_store::{Claim, NewRollout, Store, StoreOptions};

    async fn sqlite_store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("fp-collector-keys-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let url = format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display());
        let store = Store::connect(&StoreOptions { url, max_connections: 1 }).await.expect("connect");
        store.migrate().await.expect("migrate");
        (store, dir)
    }

    /// Look-ups that miss together share reads, and each gets its own
    /// target's row: a target with a token, one without (not probed yet)
    /// and one the store does not have. A store that fails answers every
    /// waiter with the failure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_look_ups_share_reads_and_each_gets_its_own_answer() {
        let (store, dir) = sqlite_store().await;
        let rollout = store.create_rollout(NewRollout::synthetic("keys", 2, 1, 600)).await.expect("rollout");
        store.dispatch(rollout).await.expect("dispatch");
        let targets = store.targets(rollout, Some(TargetState::Queued), None, 10).await.expect("targets");
        let (with_token, without) = (&targets[0], &targets[1]);
        let Claim::Claimed(context) =
            store.claim_deploy(with_token.id, with_token.attempt, false, "nonce-0").await.expect("claim")
        else {
            panic!("the target could not be claimed");
        };
        store.record_probe(&context, "linux", "x86_64", serde_json::json!({}), &[], "hash-0").await.expect("probe");

        let reader = KeyReader::start(store.report_intake());
        let unknown = Uuid::new_v4();
        let asked: Vec<Uuid> = (0..300).map(|i| [with_token.id, without.id, unknown][i % 3]).collect();
        let mut lookups = tokio::task::JoinSet::new();
        for (index, id) in asked.iter().copied().enumerate() {
            let reader = reader.clone();
            lookups.spawn(async move { (index, reader.read(id).await) });
        }
        while let Some(done) = lookups.join_next().await {
            let (index, answer) = done.expect("a look-up");
            let info = answer.expect("an answer");
            match asked[index] {
                id if id == with_token.id => {
                    let info = info.expect("the token's row");
                    assert_eq!((info.token_hash.as_str(), info.token_nonce.as_str()), ("hash-0", "nonce-0"));
                    assert_eq!((info.attempt, info.rollout_id), (with_token.attempt, rollout));
                }
                _ => assert_eq!(info, None, "no token, or no target"),
            }
        }
        assert!(reader.reads() < 300, "{} reads for 300 look-ups that waited together", reader.reads());

        store.clone().close().await;
        let failed = reader.read(with_token.id).await.expect_err("the store is closed");
        assert!(matches!(failed, ReadFailed::Store(_)), "{failed}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
