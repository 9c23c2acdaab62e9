//! For benchmarks only (feature `ceiling`, which only `crates/bench` and the
//! store's own benches turn on): a rollout's `queued` targets moved on in
//! bulk, through the state machine's bulk move, so that the dispatch bench
//! can run a million targets through dispatch without a million worker
//! claims.

use super::*;

impl Store {
    /// Every `queued` target of `rollout_id` to `failed` ("bench: done"),
    /// with its history, in one transaction; returns how many moved.
    /// `queued → failed` is an edge of the machine (a permanent error
    /// before the probe), checked like every move.
    pub async fn bench_finish_queued(&self, rollout_id: Uuid) -> Result<usize> {
        let at = self.now();
        let txn = self.begin().await?;
        let ids: Vec<Uuid> = targets::Entity::find()
            .select_only()
            .column(targets::Column::Id)
            .filter(targets::Column::RolloutId.eq(rollout_id))
            .filter(targets::Column::State.eq(TargetState::Queued.as_str()))
            .order_by_asc(targets::Column::Id)
            .lock(LockType::NoKeyUpdate)
            .into_tuple()
            .all(&txn)
            .await?;
        let steps: Vec<transition::Step> = ids
            .iter()
            .map(|id| transition::Step {
                target_id: *id,
                rollout_id,
                from: TargetState::Queued,
                detail: Some("bench: done".into()),
            })
            .collect();
        transition::move_locked(
            &txn,
            at,
            TargetState::Failed,
            &steps,
            vec![(targets::Column::FinishedAt, Expr::value(at))],
        )
        .await?;
        txn.commit().await?;
        Ok(ids.len())
    }
}

impl Store {
    /// Empties the outbox (the relay's work, which a dispatch bench leaves
    /// out of what it measures); returns how many messages were dropped.
    pub async fn bench_discard_outbox(&self) -> Result<u64> {
        Ok(outbox::Entity::delete_many().exec(&self.db).await?.rows_affected)
    }
}

impl Store {
    /// `VACUUM (ANALYZE) targets` on PostgreSQL, as autovacuum would do
    /// during a rollout that lasts hours rather than a bench's minute.
    pub async fn bench_vacuum_targets(&self) -> Result<()> {
        if self.backend() == DbBackend::Postgres {
            self.db.execute_unprepared("VACUUM (ANALYZE) targets").await?;
        }
        Ok(())
    }
}
