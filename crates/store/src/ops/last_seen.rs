//! How a target's last-seen time, from which its deadline runs, is kept
//! (issue 20).
//!
//! Every fresh report resets its target's timeout. The intake does not
//! rewrite the target's row for each one, though: it writes `last_seen_at`
//! only when the stored time is at least [`step`] old, 1 % of the target's
//! timeout (6 s of a 600 s timeout). A report inside that step is still
//! stored (its event's `received_at`, its heartbeat run's
//! `last_received_at`), so nothing is lost: before the watchdog times a
//! target out, it reads the attempt's latest report ([`latest_reports`])
//! and re-arms at the deadline that report sets, writing it back. The
//! deadline the watchdog enforces is therefore the exact one; only the
//! stored `last_seen_at` (the API's and the console's "last seen") may lag
//! the latest report by up to 1 % of the timeout.
//!
//! A report within the step takes no lock on its target's row, so a batch
//! still being written when the watchdog checks that target at its
//! deadline is not seen by it: such a report counts as late, as it did
//! before when its batch reached the row after the watchdog's lock. Either
//! way it is kept as evidence.
//!
//! Why: the row update was one of the rows every report wrote. An agent
//! reports at each patch's start and end and every `heartbeat_seconds`
//! (30 s by default); against a 1 h timeout (36 s step) most heartbeats
//! now write only their run's summary row.

use super::*;
use crate::entity::agent_heartbeats;

/// Parts of a target's timeout per step of its stored last-seen time.
pub(super) const STEPS_PER_TIMEOUT: i64 = 100;

/// How old a target's stored last-seen time must be before a report
/// rewrites it: 1 % of `timeout_seconds`.
pub(super) fn step(timeout_seconds: u32) -> chrono::Duration {
    chrono::Duration::milliseconds(i64::from(timeout_seconds) * 1_000 / STEPS_PER_TIMEOUT)
}

/// Whether a report received `at` rewrites a stored last-seen time.
pub(super) fn is_stale(stored: Option<DateTime<Utc>>, timeout_seconds: u32, at: DateTime<Utc>) -> bool {
    stored.is_none_or(|stored| stored <= at - step(timeout_seconds))
}

/// [`is_stale`] as the PostgreSQL batch statement's condition on a
/// `targets` row (`$1` is the time the batch was received).
pub(super) fn postgres_stale() -> String {
    format!(
        "(last_seen_at IS NULL OR last_seen_at <= $1 - timeout_seconds * interval '{} microseconds')",
        1_000_000 / STEPS_PER_TIMEOUT
    )
}

/// Moves the last-seen time of `touched` (targets that sent a fresh
/// report) to `at` where it is stale and the target is in flight
/// (SQLite; PostgreSQL does it in the batch statement).
pub(super) async fn touch_portable(txn: &DatabaseTransaction, touched: &[Uuid], at: DateTime<Utc>) -> Result<()> {
    for chunk in touched.chunks(INSERT_CHUNK) {
        let rows: Vec<(Uuid, Option<DateTime<Utc>>, i32)> = targets::Entity::find()
            .select_only()
            .column(targets::Column::Id)
            .column(targets::Column::LastSeenAt)
            .column(targets::Column::TimeoutSeconds)
            .filter(id_in(txn.get_database_backend(), targets::Column::Id, chunk.iter().copied()))
            .filter(targets::Column::State.is_in(state_strs(&TargetState::IN_FLIGHT)))
            .into_tuple()
            .all(txn)
            .await?;
        let stale: Vec<Uuid> = rows
            .into_iter()
            .filter(|(_, stored, timeout)| is_stale(*stored, unsigned(*timeout), at))
            .map(|(id, _, _)| id)
            .collect();
        if stale.is_empty() {
            continue;
        }
        targets::Entity::update_many()
            .col_expr(targets::Column::LastSeenAt, Expr::value(at))
            .filter(id_in(txn.get_database_backend(), targets::Column::Id, stale))
            .exec(txn)
            .await?;
    }
    Ok(())
}

fn unsigned(column: i32) -> u32 {
    u32::try_from(column).unwrap_or(0)
}

/// When each of `runs` (target, attempt) last had a report stored: its
/// latest event or heartbeat, whichever came last. Targets without one are
/// absent.
pub(super) async fn latest_reports(
    txn: &DatabaseTransaction,
    runs: &[(Uuid, u32)],
) -> Result<HashMap<Uuid, DateTime<Utc>>> {
    let wanted: HashSet<(Uuid, u32)> = runs.iter().copied().collect();
    let ids: BTreeSet<Uuid> = runs.iter().map(|(id, _)| *id).collect();
    let ids: Vec<Uuid> = ids.into_iter().collect();
    let mut latest: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
    let mut keep = |rows: Vec<(Uuid, i32, Option<DateTime<Utc>>)>| {
        for (id, attempt, at) in rows {
            let Some(at) = at else { continue };
            if wanted.contains(&(id, unsigned(attempt))) {
                let entry = latest.entry(id).or_insert(at);
                *entry = (*entry).max(at);
            }
        }
    };
    for chunk in ids.chunks(INSERT_CHUNK) {
        use agent_events::Column as Event;
        use agent_heartbeats::Column as Beats;
        keep(
            latest_per_run::<agent_events::Entity>(txn, chunk, [Event::TargetId, Event::Attempt, Event::ReceivedAt])
                .await?,
        );
        keep(
            latest_per_run::<agent_heartbeats::Entity>(
                txn,
                chunk,
                [Beats::TargetId, Beats::Attempt, Beats::LastReceivedAt],
            )
            .await?,
        );
    }
    Ok(latest)
}

/// The latest `received` per (target, attempt) of `targets` in a table
/// of reports whose columns are `[target, attempt, received]`.
async fn latest_per_run<E: EntityTrait>(
    txn: &DatabaseTransaction,
    targets: &[Uuid],
    [target, attempt, received]: [E::Column; 3],
) -> Result<Vec<(Uuid, i32, Option<DateTime<Utc>>)>> {
    Ok(E::find()
        .select_only()
        .column(target)
        .column(attempt)
        .column_as(received.max(), "latest")
        .filter(id_in(txn.get_database_backend(), target, targets.iter().copied()))
        .group_by(target)
        .group_by(attempt)
        .into_tuple()
        .all(txn)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_is_a_hundredth_of_the_timeout() {
        assert_eq!(step(600), chrono::Duration::seconds(6));
        assert_eq!(step(1), chrono::Duration::milliseconds(10));
        assert_eq!(step(3_600), chrono::Duration::seconds(36));
    }

    #[test]
    fn a_stored_time_is_rewritten_once_it_is_a_step_old() {
        let at = Utc::now();
        assert!(is_stale(None, 600, at), "never seen");
        assert!(!is_stale(Some(at), 600, at));
        assert!(!is_stale(Some(at - chrono::Duration::milliseconds(5_999)), 600, at));
        assert!(is_stale(Some(at - chrono::Duration::seconds(6)), 600, at));
        assert!(is_stale(Some(at - chrono::Duration::milliseconds(10)), 1, at));
        assert!(!is_stale(Some(at + chrono::Duration::seconds(1)), 600, at), "a later stored time stays");
    }

    #[test]
    fn the_postgres_condition_says_the_same_step() {
        assert_eq!(
            postgres_stale(),
            "(last_seen_at IS NULL OR last_seen_at <= $1 - timeout_seconds * interval '10000 microseconds')"
        );
    }
}
