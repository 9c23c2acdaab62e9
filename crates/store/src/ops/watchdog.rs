//! The watchdog's check: due timers re-armed or timed out, and the fleet gauges.

use super::last_seen;
use super::*;

impl Store {
    // ------------------------------------------------------------ watchdog

    /// The watchdog check: times the target out when it has not reported
    /// within its timeout, else says when to look again.
    pub async fn check_timeout(&self, target_id: Uuid, attempt: u32, policy: TimeoutPolicy) -> Result<WatchOutcome> {
        let outcomes = self.check_timeouts(&[(target_id, attempt)], policy).await?;
        Ok(outcomes.into_iter().next().unwrap_or(WatchOutcome::Gone))
    }

    /// The watchdog check for a batch of timers (target, attempt), in one
    /// transaction: the targets are locked in id order; each one still
    /// running that attempt and silent past its timeout is timed out (its
    /// open patches failed with the reason, its history appended), with one
    /// dispatch request per rollout and, per target, a delayed verification
    /// and an event. One outcome per timer, in order; a second timer for the
    /// same target in the batch finds it gone.
    pub async fn check_timeouts(&self, timers: &[(Uuid, u32)], policy: TimeoutPolicy) -> Result<Vec<WatchOutcome>> {
        if timers.is_empty() {
            return Ok(vec![]);
        }
        let txn = self.begin().await?;
        let mut ids: Vec<Uuid> = timers.iter().map(|(id, _)| *id).collect();
        ids.sort();
        ids.dedup();
        let mut current: HashMap<Uuid, Target> = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(INSERT_CHUNK) {
            let rows = targets::Entity::find()
                .filter(targets::Column::Id.is_in(chunk.iter().copied()))
                .order_by_asc(targets::Column::Id)
                .lock(LockType::NoKeyUpdate)
                .all(&txn)
                .await?;
            for row in rows {
                let target = target_from(row)?;
                current.insert(target.id, target);
            }
        }
        let at = self.now();
        fn watched<'a>(current: &'a HashMap<Uuid, Target>, id: &Uuid, attempt: u32) -> Option<&'a Target> {
            current.get(id).filter(|target| target.state == TargetState::Running && target.attempt == attempt)
        }
        let deadline = |target: &Target| {
            let last = target.last_seen_at.into_iter().chain(target.running_at).max().unwrap_or(at);
            last + chrono::Duration::seconds(i64::from(target.timeout_seconds))
        };
        // The stored last-seen time lags the latest report by up to a step
        // (see `last_seen`): where it says the deadline passed, the
        // attempt's latest report decides, and is written back.
        let due: Vec<(Uuid, u32)> = timers
            .iter()
            .filter_map(|(id, attempt)| watched(&current, id, *attempt))
            .filter(|target| at >= deadline(target))
            .map(|target| (target.id, target.attempt))
            .collect();
        for (id, latest) in last_seen::latest_reports(&txn, &due).await? {
            let Some(target) = current.get_mut(&id) else { continue };
            if target.last_seen_at.is_some_and(|stored| stored >= latest) {
                continue;
            }
            target.last_seen_at = Some(latest);
            targets::Entity::update_many()
                .col_expr(targets::Column::LastSeenAt, Expr::value(latest))
                .filter(targets::Column::Id.eq(id))
                .exec(&txn)
                .await?;
        }
        let mut expired = HashSet::new();
        let outcomes: Vec<WatchOutcome> = timers
            .iter()
            .map(|(id, attempt)| match watched(&current, id, *attempt) {
                Some(target) => {
                    let deadline = deadline(target);
                    if at < deadline {
                        WatchOutcome::NotYet(deadline)
                    } else if expired.insert(*id) {
                        WatchOutcome::TimedOut
                    } else {
                        WatchOutcome::Gone
                    }
                }
                _ => WatchOutcome::Gone,
            })
            .collect();
        if expired.is_empty() {
            txn.commit().await?;
            return Ok(outcomes);
        }
        let expired: Vec<&Target> = ids.iter().filter(|id| expired.contains(id)).map(|id| &current[id]).collect();
        let reason_for =
            |timeout: u32| format!("no feedback received within {timeout} s; the deployment may have failed");
        let mut by_timeout: BTreeMap<u32, Vec<Uuid>> = BTreeMap::new();
        for target in &expired {
            by_timeout.entry(target.timeout_seconds).or_default().push(target.id);
        }
        for (timeout, ids) in by_timeout {
            let reason = reason_for(timeout);
            let steps: Vec<transition::Step> = ids
                .iter()
                .map(|id| transition::Step {
                    target_id: *id,
                    rollout_id: current[id].rollout_id,
                    from: TargetState::Running,
                    detail: Some(reason.clone()),
                })
                .collect();
            let sets = vec![
                (targets::Column::Error, Expr::value(reason.clone())),
                (targets::Column::FinishedAt, Expr::value(at)),
            ];
            // Locked above and checked to be running.
            transition::move_locked(&txn, at, TargetState::TimedOut, &steps, sets).await?;
            fail_open_patches(&txn, ids, &reason, at).await?;
        }
        let rollouts: BTreeSet<Uuid> = expired.iter().map(|target| target.rollout_id).collect();
        let mut messages: Vec<Outgoing> = rollouts.into_iter().map(dispatch_message).collect();
        for target in &expired {
            messages.push(
                Outgoing::work(
                    routing::VERIFY,
                    v1::VerifyJob { target_id: target.id.to_string(), attempt: target.attempt, cleanup_after: true }
                        .encode_to_vec(),
                )
                .delayed(policy.verify_delay),
            );
            messages.push(event_message(
                target.id,
                target.rollout_id,
                TargetState::Running,
                TargetState::TimedOut,
                &reason_for(target.timeout_seconds),
                at,
            ));
        }
        push_outbox(&txn, at, messages).await?;
        txn.commit().await?;
        Ok(outcomes)
    }

    /// What the scheduler exports as gauges: rollouts per state, the targets
    /// of running and paused rollouts per state, and the outbox rows not yet
    /// published (the relay's backlog).
    pub async fn fleet_gauges(&self) -> Result<FleetGauges> {
        let rollouts: Vec<(String, i64)> = rollouts::Entity::find()
            .select_only()
            .column(rollouts::Column::State)
            .column_as(rollouts::Column::Id.count(), "n")
            .group_by(rollouts::Column::State)
            .into_tuple()
            .all(&self.db)
            .await?;
        let active = rollouts::Entity::find()
            .select_only()
            .column(rollouts::Column::Id)
            .filter(rollouts::Column::State.is_in([RolloutState::Running.as_str(), RolloutState::Paused.as_str()]))
            .into_query();
        let targets: Vec<(String, i64)> = targets::Entity::find()
            .select_only()
            .column(targets::Column::State)
            .column_as(targets::Column::Id.count(), "n")
            .filter(targets::Column::RolloutId.in_subquery(active))
            .group_by(targets::Column::State)
            .into_tuple()
            .all(&self.db)
            .await?;
        let outbox_pending = self.outbox_depth().await?;
        Ok(FleetGauges {
            rollouts_by_state: rollouts.into_iter().map(|(state, n)| (state, n as u64)).collect(),
            active_targets_by_state: targets.into_iter().map(|(state, n)| (state, n as u64)).collect(),
            outbox_pending,
        })
    }

    /// Publishes `messages` through the outbox (in their own transaction).
    pub async fn enqueue(&self, messages: Vec<Outgoing>) -> Result<()> {
        push_outbox(&self.db, self.now(), messages).await
    }
}
