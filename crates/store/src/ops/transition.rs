//! The one way a target's state moves. Every move, single or bulk, is
//! checked against the state machine ([`TargetState::can_move_to`]) at run
//! time, applied to a row that was read under lock, and appended to the
//! target's history (`target_transitions`) in the same transaction. A move
//! the machine does not have is refused with [`Error::IllegalTransition`]
//! and its transaction is rolled back: nothing is written.
//!
//! Three forms:
//! * [`apply_move`] — one target, guarded: it locks the row, and a target
//!   no longer in one of the expected states (or of another attempt) is
//!   left alone (`None`: a duplicate job, or the target moved on);
//! * [`move_locked`] — many targets whose rows the caller read under lock
//!   (`FOR NO KEY UPDATE`) in the states it passes: updated by primary key
//!   alone (a state condition beside the ids lets PostgreSQL combine the
//!   primary key with the `targets_state` index, a bitmap AND that reads
//!   every entry of that state, dead versions included);
//! * [`move_every`] — every target of a rollout in one state to a final
//!   one, by that state (an abort of a million pending targets reads none
//!   of them).
//!
//! A move back to `pending` also records a dispatch rewind
//! ([`super::cursor`]) in the same transaction, so dispatch's cursor never
//! passes over a pending target.
//!
//! The conformance suite's property test drives random operations against
//! both stores and checks that every recorded move is an edge of the machine.

use super::*;

/// Refuses a move the state machine does not have.
pub(super) fn check(target_id: Uuid, from: TargetState, to: TargetState) -> Result<()> {
    if from.can_move_to(to) {
        Ok(())
    } else {
        Err(Error::IllegalTransition { target_id, from, to })
    }
}

/// One target's guarded move: allowed from any of `from`, in `attempt` if
/// given, with extra columns `sets`.
pub(super) struct Move<'a> {
    pub rollout_id: Uuid,
    pub target_id: Uuid,
    pub attempt: Option<u32>,
    pub from: &'a [TargetState],
    pub to: TargetState,
    pub detail: Option<String>,
    pub sets: Vec<(targets::Column, SimpleExpr)>,
}

/// Locks the target row, checks the move, applies it as a guarded UPDATE and
/// appends it to the history. Returns the state it moved from, or `None`
/// when the guard did not match (a duplicate, or the target moved on).
pub(super) async fn apply_move(
    txn: &DatabaseTransaction,
    at: DateTime<Utc>,
    mv: Move<'_>,
) -> Result<Option<TargetState>> {
    let current = targets::Entity::find_by_id(mv.target_id)
        .select_only()
        .column(targets::Column::State)
        .column(targets::Column::Attempt)
        .lock(LockType::NoKeyUpdate)
        .into_tuple::<(String, i32)>()
        .one(txn)
        .await?;
    let Some((state, attempt)) = current else { return Ok(None) };
    let from: TargetState = parse(&state, "target state")?;
    if !mv.from.contains(&from) || mv.attempt.is_some_and(|a| a as i32 != attempt) {
        return Ok(None);
    }
    check(mv.target_id, from, mv.to)?;
    let mut update = targets::Entity::update_many()
        .col_expr(targets::Column::State, Expr::value(mv.to.as_str()))
        .col_expr(targets::Column::UpdatedAt, Expr::value(at));
    for (column, value) in mv.sets {
        update = update.col_expr(column, value);
    }
    let updated = update
        .filter(targets::Column::Id.eq(mv.target_id))
        .filter(targets::Column::State.eq(from.as_str()))
        .filter(targets::Column::Attempt.eq(attempt))
        .exec(txn)
        .await?;
    if updated.rows_affected != 1 {
        return Ok(None);
    }
    record(txn, at, mv.to, &[Step { target_id: mv.target_id, rollout_id: mv.rollout_id, from, detail: mv.detail }])
        .await?;
    if mv.to == TargetState::Pending {
        super::cursor::record_rewinds(txn, [mv.target_id]).await?;
    }
    Ok(Some(from))
}

/// A target the caller read under lock in state `from`, to be moved.
pub(super) struct Step {
    pub target_id: Uuid,
    pub rollout_id: Uuid,
    pub from: TargetState,
    pub detail: Option<String>,
}

/// Moves targets read under lock (each in its `from`) to `to`, with the
/// extra columns `sets`: every step checked first (one illegal step refuses
/// them all), then one UPDATE by primary key per chunk and their history.
pub(super) async fn move_locked(
    txn: &DatabaseTransaction,
    at: DateTime<Utc>,
    to: TargetState,
    steps: &[Step],
    sets: Vec<(targets::Column, SimpleExpr)>,
) -> Result<()> {
    for step in steps {
        check(step.target_id, step.from, to)?;
    }
    for chunk in steps.chunks(INSERT_CHUNK) {
        let mut update = targets::Entity::update_many()
            .col_expr(targets::Column::State, Expr::value(to.as_str()))
            .col_expr(targets::Column::UpdatedAt, Expr::value(at));
        for (column, value) in &sets {
            update = update.col_expr(*column, value.clone());
        }
        let ids = chunk.iter().map(|step| step.target_id);
        let updated = update.filter(id_in(txn.get_database_backend(), targets::Column::Id, ids)).exec(txn).await?;
        if updated.rows_affected != chunk.len() as u64 {
            return Err(Error::Corrupt(format!(
                "moving {} locked targets to {to} updated {} rows",
                chunk.len(),
                updated.rows_affected
            )));
        }
        record(txn, at, to, chunk).await?;
        if to == TargetState::Pending {
            // Back behind dispatch's cursor, maybe: the next dispatch looks there.
            super::cursor::record_rewinds(txn, chunk.iter().map(|step| step.target_id)).await?;
        }
    }
    Ok(())
}

/// Moves every target of `rollout_id` in state `from` to a final state `to`
/// (its `finished_at` set, its offline wait cleared, and its `error` set
/// when given), with its history, by their state rather than their ids:
/// the move is checked once, and each row is matched (so locked) by the
/// statement that moves it. On PostgreSQL one statement (the UPDATE's
/// `RETURNING` feeds the history's INSERT); on SQLite, whose transaction
/// holds the only write lock, the history from the rows, then the UPDATE,
/// their counts compared. Returns how many moved.
pub(super) async fn move_every(
    txn: &DatabaseTransaction,
    at: DateTime<Utc>,
    rollout_id: Uuid,
    from: TargetState,
    to: TargetState,
    detail: &str,
    error: Option<&str>,
) -> Result<u64> {
    // The nil target: every target of the rollout in that state.
    check(Uuid::nil(), from, to)?;
    let backend = txn.get_database_backend();
    let statement =
        |sql: String, values: Vec<sea_orm::Value>| sea_orm::Statement::from_sql_and_values(backend, sql, values);
    if backend == DbBackend::Postgres {
        let set_error = if error.is_some() { ", error = $6" } else { "" };
        let sql = format!(
            "WITH moved AS (UPDATE targets SET state = $1, updated_at = $2, finished_at = $2, offline_until = NULL, \
             next_check_at = NULL{set_error} WHERE rollout_id = $3 AND state = $4 RETURNING id) \
             INSERT INTO target_transitions (rollout_id, target_id, from_state, to_state, at, detail) \
             SELECT $3, id, $4, $1, $2, $5 FROM moved"
        );
        let mut values = vec![to.as_str().into(), at.into(), rollout_id.into(), from.as_str().into(), detail.into()];
        values.extend(error.map(Into::into));
        return Ok(txn.execute(statement(sql, values)).await?.rows_affected());
    }
    let history = "INSERT INTO target_transitions (rollout_id, target_id, from_state, to_state, at, detail) \
                   SELECT rollout_id, id, ?, ?, ?, ? FROM targets WHERE rollout_id = ? AND state = ?";
    let values = vec![
        from.as_str().into(),
        to.as_str().into(),
        at.into(),
        detail.into(),
        rollout_id.into(),
        from.as_str().into(),
    ];
    let recorded = txn.execute(statement(history.into(), values)).await?.rows_affected();
    let set_error = if error.is_some() { ", error = ?" } else { "" };
    let update = format!(
        "UPDATE targets SET state = ?, updated_at = ?, finished_at = ?, offline_until = NULL, next_check_at = NULL\
         {set_error} WHERE rollout_id = ? AND state = ?"
    );
    let mut values: Vec<sea_orm::Value> = vec![to.as_str().into(), at.into(), at.into()];
    values.extend(error.map(Into::into));
    values.extend([rollout_id.into(), from.as_str().into()]);
    let moved = txn.execute(statement(update, values)).await?.rows_affected();
    if moved != recorded {
        return Err(Error::Corrupt(format!(
            "moving the {from} targets to {to} moved {moved} rows but recorded {recorded}"
        )));
    }
    Ok(moved)
}

/// Appends checked moves to the targets' history. On PostgreSQL one
/// statement whose text never changes (the moves travel as arrays, see
/// [`super::push_outbox`]); elsewhere a multi-row insert.
async fn record(txn: &DatabaseTransaction, at: DateTime<Utc>, to: TargetState, steps: &[Step]) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    if txn.get_database_backend() == DbBackend::Postgres {
        use sea_orm::sea_query::ArrayType;
        let values = vec![
            pg_array(ArrayType::Uuid, steps.iter().map(|step| step.rollout_id)),
            pg_array(ArrayType::Uuid, steps.iter().map(|step| step.target_id)),
            pg_array(ArrayType::String, steps.iter().map(|step| step.from.as_str())),
            to.as_str().into(),
            at.into(),
            pg_array(ArrayType::Bool, steps.iter().map(|step| step.detail.is_some())),
            pg_array(ArrayType::String, steps.iter().map(|step| step.detail.clone().unwrap_or_default())),
        ];
        txn.execute(sea_orm::Statement::from_sql_and_values(DbBackend::Postgres, RECORD_POSTGRES, values)).await?;
        return Ok(());
    }
    let rows = steps.iter().map(|step| target_transitions::ActiveModel {
        rollout_id: Set(step.rollout_id),
        target_id: Set(step.target_id),
        from_state: Set(step.from.as_str().into()),
        to_state: Set(to.as_str().into()),
        at: Set(at),
        detail: Set(step.detail.clone()),
        ..Default::default()
    });
    target_transitions::Entity::insert_many(rows).exec_without_returning(txn).await?;
    Ok(())
}

/// [`record`] on PostgreSQL, in the steps' order (the history's ids follow it).
const RECORD_POSTGRES: &str =
    "INSERT INTO target_transitions (rollout_id, target_id, from_state, to_state, at, detail) \
     SELECT s.rollout_id, s.target_id, s.from_state, $4, $5, CASE WHEN s.has_detail THEN s.detail END \
     FROM unnest($1::uuid[], $2::uuid[], $3::text[], $6::bool[], $7::text[]) WITH ORDINALITY \
          AS s(rollout_id, target_id, from_state, has_detail, detail, n) \
     ORDER BY s.n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_off_the_machine_is_refused_by_name() {
        let id = Uuid::nil();
        for from in TargetState::ALL {
            for to in TargetState::ALL {
                let checked = check(id, from, to);
                assert_eq!(checked.is_ok(), from.can_move_to(to), "{from} -> {to}");
                if let Err(error) = checked {
                    assert!(matches!(error, Error::IllegalTransition { .. }));
                    assert!(error.to_string().contains(&format!("from {from} to {to}")), "{error}");
                }
            }
        }
    }
}
