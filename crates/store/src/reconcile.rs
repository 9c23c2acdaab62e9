//! What the scheduler's reconciler asks the store: every kind of lost
//! message leaves a trace in the database that these queries find, each
//! ordered and paged so a large fleet is walked completely, never sampled.
//!
//! * a deploy job lost (dead-lettered, or dropped with a dead broker): the
//!   target sits in `queued`, `probing`, `staging` or `installing` with no
//!   progress ([`Store::stuck_in_flight_targets`]);
//! * a dispatch request lost: a running rollout has pending targets and
//!   nothing moves them ([`Store::rollouts_with_pending_targets`]);
//! * a watch timer lost: a running target is past its deadline
//!   ([`Store::overdue_running_deadlines`]).
//!
//! Re-publishing is always safe: every consumer applies a message through a
//! guarded transition, so a duplicate of a message that was not lost
//! changes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use fleetpatch_bus::Outgoing;
use fleetpatch_proto::state::{RolloutState, TargetState};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait};
use uuid::Uuid;

use crate::entity::{rollouts, targets};
use crate::ops::deploy_job;
use crate::{Result, Store};

/// The in-flight states a worker's job moves a target through before its
/// agent runs; a target that stays in one of them has lost its job.
pub const JOB_STATES: [TargetState; 4] =
    [TargetState::Queued, TargetState::Probing, TargetState::Staging, TargetState::Installing];

/// A running target past its deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverdueTarget {
    pub target_id: Uuid,
    pub attempt: u32,
    pub deadline: DateTime<Utc>,
}

impl Store {
    /// Deploy jobs to re-publish for targets that stayed in a job state
    /// (queued … installing) for longer than `grace`, oldest first, at most
    /// `limit`. The worker that takes one over asks the target whether its
    /// agent already started, so a job that was only slow starts no second agent.
    pub async fn stuck_in_flight_targets(&self, grace: Duration, limit: u64) -> Result<Vec<Outgoing>> {
        let cutoff = self.now() - chrono::Duration::from_std(grace).unwrap_or_default();
        let rows: Vec<(Uuid, Uuid, i32, i32)> = targets::Entity::find()
            .select_only()
            .column(targets::Column::Id)
            .column(targets::Column::RolloutId)
            .column(targets::Column::Attempt)
            .column(targets::Column::Try)
            .filter(targets::Column::State.is_in(JOB_STATES.map(|s| s.as_str())))
            .filter(targets::Column::UpdatedAt.lt(cutoff))
            .order_by_asc(targets::Column::UpdatedAt)
            .order_by_asc(targets::Column::Id)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, rollout, attempt, try_)| deploy_job(id, rollout, attempt as u32, try_ as u32))
            .collect())
    }

    /// Running rollouts that still have pending targets, by id after
    /// `after` (a page), at most `limit`: each gets a dispatch request
    /// (dispatch fills only free slots, so a rollout already full is unchanged).
    pub async fn rollouts_with_pending_targets(&self, after: Option<Uuid>, limit: u64) -> Result<Vec<Uuid>> {
        let pending = targets::Entity::find()
            .select_only()
            .column(targets::Column::RolloutId)
            .filter(targets::Column::State.eq(TargetState::Pending.as_str()))
            .into_query();
        let mut query = rollouts::Entity::find()
            .select_only()
            .column(rollouts::Column::Id)
            .filter(rollouts::Column::State.eq(RolloutState::Running.as_str()))
            .filter(rollouts::Column::Id.in_subquery(pending));
        if let Some(after) = after {
            query = query.filter(rollouts::Column::Id.gt(after));
        }
        Ok(query.order_by_asc(rollouts::Column::Id).limit(limit).into_tuple().all(&self.db).await?)
    }

    /// Rollouts waiting for a maintenance window whose next opening (or
    /// deadline) has come: a dispatch pass resumes them (or marks their
    /// targets `missed_window`).
    pub async fn rollouts_due_for_window(&self, limit: u64) -> Result<Vec<Uuid>> {
        Ok(rollouts::Entity::find()
            .select_only()
            .column(rollouts::Column::Id)
            .filter(rollouts::Column::State.eq(RolloutState::WaitingForWindow.as_str()))
            .filter(rollouts::Column::NextWindowAt.lte(self.now()))
            .order_by_asc(rollouts::Column::NextWindowAt)
            .limit(limit)
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// Running targets whose deadline (last report + timeout) passed more
    /// than `grace` ago: their watch timer was lost or is very late. Walks
    /// the running targets by last report, oldest first, in pages of
    /// `page`, until the last report is too recent for any deadline to have
    /// passed; returns at most `limit`.
    pub async fn overdue_running_deadlines(
        &self,
        grace: Duration,
        page: u64,
        limit: usize,
    ) -> Result<Vec<OverdueTarget>> {
        let cutoff = self.now() - chrono::Duration::from_std(grace).unwrap_or_default();
        let mut overdue = Vec::new();
        let mut after: Option<(DateTime<Utc>, Uuid)> = None;
        loop {
            let mut query = targets::Entity::find()
                .select_only()
                .column(targets::Column::Id)
                .column(targets::Column::Attempt)
                .column(targets::Column::LastSeenAt)
                .column(targets::Column::TimeoutSeconds)
                .filter(targets::Column::State.eq(TargetState::Running.as_str()))
                // Every timeout is at least a second: a target seen after the
                // cutoff cannot be overdue by `grace`.
                .filter(targets::Column::LastSeenAt.lt(cutoff));
            if let Some((seen, id)) = after {
                query = query.filter(
                    targets::Column::LastSeenAt
                        .gt(seen)
                        .or(targets::Column::LastSeenAt.eq(seen).and(targets::Column::Id.gt(id))),
                );
            }
            let rows: Vec<(Uuid, i32, Option<DateTime<Utc>>, i32)> = query
                .order_by_asc(targets::Column::LastSeenAt)
                .order_by_asc(targets::Column::Id)
                .limit(page)
                .into_tuple()
                .all(&self.db)
                .await?;
            let full_page = rows.len() as u64 == page;
            for (id, attempt, seen, timeout) in rows {
                let Some(seen) = seen else { continue };
                after = Some((seen, id));
                let deadline = seen + chrono::Duration::seconds(i64::from(timeout));
                if deadline < cutoff {
                    overdue.push(OverdueTarget { target_id: id, attempt: attempt as u32, deadline });
                    if overdue.len() >= limit {
                        return Ok(overdue);
                    }
                }
            }
            if !full_page {
                return Ok(overdue);
            }
        }
    }
}
