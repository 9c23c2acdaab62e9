//! Dispatch's cursor over a rollout's pending targets (migration
//! `m20261204_000002_dispatch_cursor`).
//!
//! Invariant: no pending target of the rollout sorts before the cursor by
//! `(wave, ordinal)`. Creation starts it at `(0, 0)`; only dispatch moves it
//! forward, past targets it has just queued or found not pending; every
//! move back to `pending` goes through [`super::transition`], which records
//! a rewind ([`record_rewinds`]) that the next dispatch folds in
//! ([`take_rewinds`]) before it scans. The scan starts at the cursor, so
//! the `targets_dispatch` entries of the targets already dispatched (dead
//! until a VACUUM) are not walked again by every dispatch.

use super::*;
use crate::entity::dispatch_rewinds;

/// A position in dispatch order: a wave, then an ordinal within it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Cursor {
    pub wave: i32,
    pub ordinal: i32,
}

impl Cursor {
    /// The first position of `wave`.
    pub fn wave_start(wave: u32) -> Self {
        Cursor { wave: wave as i32, ordinal: 0 }
    }

    /// The position right after this one.
    pub fn next(self) -> Self {
        Cursor { wave: self.wave, ordinal: self.ordinal.saturating_add(1) }
    }

    /// The targets of waves before `wave` at or after the cursor: `wave <
    /// W AND (wave, ordinal) >= (cw, co)`. PostgreSQL starts the index scan
    /// at the cursor with this row comparison.
    pub fn earlier_than(self, wave: u32) -> SimpleExpr {
        let columns =
            Expr::tuple([Expr::col(targets::Column::Wave).into(), Expr::col(targets::Column::Ordinal).into()]);
        let at_or_after = columns.gte(Expr::tuple([Expr::value(self.wave), Expr::value(self.ordinal)]));
        Condition::all().add(targets::Column::Wave.lt(wave as i32)).add(at_or_after).into()
    }

    /// The targets of `wave` at or after the cursor, or `None` when the
    /// cursor is past the wave: `wave = W AND ordinal >= o`, as plain
    /// column conditions. (A row comparison beside `wave = W` is not a scan
    /// bound: PostgreSQL then walked the wave from its first entry.)
    pub fn in_wave(self, wave: u32) -> Option<SimpleExpr> {
        let from = self.max(Cursor::wave_start(wave));
        (from.wave == wave as i32).then(|| {
            Condition::all()
                .add(targets::Column::Wave.eq(wave as i32))
                .add(targets::Column::Ordinal.gte(from.ordinal))
                .into()
        })
    }
}

/// The rollout's cursor as stored, moved back to the earliest rewind
/// recorded since the last dispatch; the rewinds it read are deleted. The
/// caller holds the rollout's row lock (rewinds committed after this read
/// stay for the next dispatch).
pub(super) async fn take_rewinds(txn: &DatabaseTransaction, rollout: &rollouts::Model) -> Result<Cursor> {
    let stored = Cursor { wave: rollout.dispatch_wave, ordinal: rollout.dispatch_ordinal };
    let rewinds: Vec<(i64, i32, i32)> = dispatch_rewinds::Entity::find()
        .select_only()
        .column(dispatch_rewinds::Column::Id)
        .column(dispatch_rewinds::Column::Wave)
        .column(dispatch_rewinds::Column::Ordinal)
        .filter(dispatch_rewinds::Column::RolloutId.eq(rollout.id))
        .into_tuple()
        .all(txn)
        .await?;
    let mut cursor = stored;
    for chunk in rewinds.chunks(INSERT_CHUNK) {
        for (_, wave, ordinal) in chunk {
            cursor = cursor.min(Cursor { wave: *wave, ordinal: *ordinal });
        }
        dispatch_rewinds::Entity::delete_many()
            .filter(dispatch_rewinds::Column::Id.is_in(chunk.iter().map(|(id, _, _)| *id)))
            .exec(txn)
            .await?;
    }
    Ok(cursor)
}

/// Records that these targets, just moved back to `pending`, sit where
/// their rollouts' cursors may already have passed: one rewind per
/// rollout and wave, at the wave's lowest ordinal among them.
pub(super) async fn record_rewinds(
    txn: &DatabaseTransaction,
    target_ids: impl IntoIterator<Item = Uuid>,
) -> Result<()> {
    let ids: Vec<Uuid> = target_ids.into_iter().collect();
    for chunk in ids.chunks(INSERT_CHUNK) {
        let lowest = Query::select()
            .column(targets::Column::RolloutId)
            .column(targets::Column::Wave)
            .expr(Func::min(Expr::col(targets::Column::Ordinal)))
            .from(targets::Entity)
            .and_where(targets::Column::Id.is_in(chunk.iter().copied()))
            .group_by_col(targets::Column::RolloutId)
            .group_by_col(targets::Column::Wave)
            .to_owned();
        let insert = Query::insert()
            .into_table(dispatch_rewinds::Entity)
            .columns([
                dispatch_rewinds::Column::RolloutId,
                dispatch_rewinds::Column::Wave,
                dispatch_rewinds::Column::Ordinal,
            ])
            .select_from(lowest)
            .map_err(|e| Error::Db(sea_orm::DbErr::Custom(format!("the dispatch rewind insert: {e}"))))?
            .to_owned();
        txn.execute(txn.get_database_backend().build(&insert)).await?;
    }
    Ok(())
}

/// The first pending target, by `(wave, ordinal)`, of those `range`
/// selects ([`Cursor::earlier_than`], [`Cursor::in_wave`]).
pub(super) async fn first_pending(
    txn: &DatabaseTransaction,
    rollout_id: Uuid,
    range: SimpleExpr,
) -> Result<Option<Cursor>> {
    let found: Option<(i32, i32)> = targets::Entity::find()
        .select_only()
        .column(targets::Column::Wave)
        .column(targets::Column::Ordinal)
        .filter(targets::Column::RolloutId.eq(rollout_id))
        .filter(targets::Column::State.eq(TargetState::Pending.as_str()))
        .filter(range)
        .order_by_asc(targets::Column::Wave)
        .order_by_asc(targets::Column::Ordinal)
        .limit(1)
        .into_tuple()
        .one(txn)
        .await?;
    Ok(found.map(|(wave, ordinal)| Cursor { wave, ordinal }))
}

#[cfg(test)]
mod tests {
    use super::Cursor;

    #[test]
    fn cursors_sort_by_wave_then_ordinal() {
        let a = Cursor { wave: 0, ordinal: 900 };
        let b = Cursor { wave: 1, ordinal: 0 };
        assert!(a < b);
        assert_eq!(a.min(b), a);
        assert_eq!(Cursor::wave_start(1), b);
        assert_eq!(a.next(), Cursor { wave: 0, ordinal: 901 });
        assert_eq!(Cursor { wave: 0, ordinal: i32::MAX }.next().ordinal, i32::MAX);
        // A cursor in an earlier wave scans a later one from its start; one
        // past the wave scans nothing of it.
        assert!(a.in_wave(0).is_some() && a.in_wave(1).is_some());
        assert!(b.in_wave(0).is_none());
    }
}
