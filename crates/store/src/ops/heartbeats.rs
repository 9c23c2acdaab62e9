//! Heartbeats kept as one summary row per agent run (`agent_heartbeats`,
//! issue 20) instead of one `agent_events` row each.
//!
//! A heartbeat only has to move its target's deadline. Per (target,
//! attempt, agent instance) the store keeps how many heartbeats did, the
//! highest heartbeat seq and when the first and the last arrived. An agent
//! sends its spool in seq order and resends a batch unchanged until it is
//! acknowledged, so a heartbeat at or below the stored highest seq was
//! stored before: it is answered as a duplicate, is not counted again and
//! moves no deadline. With `collector.heartbeat_events = "every"` the
//! heartbeats are also kept as event rows (one per heartbeat, as before).

use super::intake::{pg_array, ReportKey};
use super::*;
use crate::entity::agent_heartbeats;

/// A (target, attempt, agent instance): one agent run.
type Run = (Uuid, u32, AgentInstance);

fn run_of(report: &IncomingReport) -> Run {
    (report.target_id, report.attempt, report.agent_instance)
}

fn heartbeat_patch(report: &IncomingReport) -> Option<u32> {
    match report.kind {
        ReportKind::Heartbeat { patch_index } => patch_index,
        _ => None,
    }
}

/// The PostgreSQL statement's heartbeats (`hb_in`), before `known`
/// (the batch's targets the store has). Parameters `$25`–`$30`.
pub(super) const POSTGRES_INPUT: &str = "hb_in AS ( \
         SELECT * FROM unnest($25::uuid[], $26::int[], $27::bigint[], $28::bigint[], $29::bool[], $30::int[]) \
         AS h(target_id, attempt, agent_instance, seq, has_patch, patch_index) \
     )";

/// The PostgreSQL statement's part for heartbeats: `hb_fresh` (the
/// heartbeats of known targets above their run's stored highest seq, in the
/// statement's snapshot) and `hb_saved` (one upsert per run: the count grows by its
/// fresh heartbeats, the highest seq and the last time move). The upsert's
/// `WHERE` keeps a concurrent statement that saw the same snapshot from
/// counting the same heartbeats twice when it brings nothing newer; one
/// that overlaps a batch still in flight and goes further (a resend racing
/// its original, with more behind it) counts the overlap twice: the count
/// is then high by that overlap, the highest seq and the deadline are
/// right.
///
/// Each heartbeat's stored run is read by a sub-query of its own, by the
/// primary key, not joined: the intake's plan is generic and built once per
/// connection, and for a join PostgreSQL chose it from the table's size at
/// that moment. Built while `agent_heartbeats` had never been analyzed (a
/// new database; PostgreSQL then assumes 880 rows), the join hashed a
/// sequential scan of the whole table for every batch with heartbeats, until
/// autovacuum's first `ANALYZE` of it: in one `fleetpatch bench`, 1,724
/// scans read 1.7 million rows (`pg_stat_user_tables`).
pub(super) const POSTGRES_CTES: &str = "hb_fresh AS ( \
         SELECT h.* FROM hb_in AS h \
         WHERE h.seq > COALESCE((SELECT p.last_seq FROM agent_heartbeats AS p \
                                 WHERE p.target_id = h.target_id AND p.attempt = h.attempt \
                                       AND p.agent_instance = h.agent_instance), -1) \
               AND h.target_id IN (SELECT id FROM known) \
     ), hb_saved AS ( \
         INSERT INTO agent_heartbeats (target_id, attempt, agent_instance, count, last_seq, patch_index, \
                                       first_received_at, last_received_at) \
         SELECT DISTINCT ON (target_id, attempt, agent_instance) target_id, attempt, agent_instance, \
                count(*) OVER run, seq, CASE WHEN has_patch THEN patch_index END, $1, $1 \
         FROM hb_fresh WINDOW run AS (PARTITION BY target_id, attempt, agent_instance) \
         ORDER BY target_id, attempt, agent_instance, seq DESC \
         ON CONFLICT (target_id, attempt, agent_instance) DO UPDATE SET \
             count = agent_heartbeats.count + excluded.count, last_seq = excluded.last_seq, \
             patch_index = excluded.patch_index, last_received_at = excluded.last_received_at \
         WHERE agent_heartbeats.last_seq < excluded.last_seq \
     )";

/// The values of `$25`–`$30` for [`POSTGRES_INPUT`].
pub(super) fn postgres_values(beats: &[&IncomingReport]) -> Vec<sea_orm::Value> {
    use sea_orm::sea_query::ArrayType;
    vec![
        pg_array(ArrayType::Uuid, beats.iter().map(|r| r.target_id)),
        pg_array(ArrayType::Int, beats.iter().map(|r| r.attempt as i32)),
        pg_array(ArrayType::BigInt, beats.iter().map(|r| r.agent_instance.to_column())),
        pg_array(ArrayType::BigInt, beats.iter().map(|r| r.seq as i64)),
        pg_array(ArrayType::Bool, beats.iter().map(|r| heartbeat_patch(r).is_some())),
        pg_array(ArrayType::Int, beats.iter().map(|r| heartbeat_patch(r).unwrap_or(0) as i32)),
    ]
}

/// Any backend (SQLite, inside the batch's transaction): per run, the
/// stored summary is read, the heartbeats above its highest seq counted
/// and the summary written. Returns the fresh heartbeats.
pub(super) async fn apply_portable(
    txn: &DatabaseTransaction,
    beats: &[&IncomingReport],
    received_at: DateTime<Utc>,
) -> Result<Vec<ReportKey>> {
    let mut runs: BTreeMap<Run, Vec<&IncomingReport>> = BTreeMap::new();
    for beat in beats {
        runs.entry(run_of(beat)).or_default().push(beat);
    }
    let mut fresh = Vec::new();
    for ((target_id, attempt, instance), mut reports) in runs {
        reports.sort_by_key(|r| r.seq);
        let key = (target_id, attempt as i32, instance.to_column());
        let stored = agent_heartbeats::Entity::find_by_id(key).one(txn).await?;
        let above = stored.as_ref().map_or(0, |s| s.last_seq as u64);
        let new: Vec<&IncomingReport> = reports.into_iter().filter(|r| stored.is_none() || r.seq > above).collect();
        let Some(last) = new.last() else { continue };
        fresh.extend(new.iter().map(|r| ReportKey::of(r)));
        let patch_index = heartbeat_patch(last).map(|i| i as i32);
        match stored {
            Some(row) => {
                let mut row: agent_heartbeats::ActiveModel = row.into();
                row.count = Set(row.count.take().unwrap_or(0) + new.len() as i64);
                row.last_seq = Set(last.seq as i64);
                row.patch_index = Set(patch_index);
                row.last_received_at = Set(received_at);
                agent_heartbeats::Entity::update(row).exec(txn).await?;
            }
            None => {
                agent_heartbeats::Entity::insert(agent_heartbeats::ActiveModel {
                    target_id: Set(target_id),
                    attempt: Set(attempt as i32),
                    agent_instance: Set(instance.to_column()),
                    count: Set(new.len() as i64),
                    last_seq: Set(last.seq as i64),
                    patch_index: Set(patch_index),
                    first_received_at: Set(received_at),
                    last_received_at: Set(received_at),
                })
                .exec_without_returning(txn)
                .await?;
            }
        }
    }
    Ok(fresh)
}

/// How many of `heartbeats` (agent instance, seq) of `attempt` are stored:
/// those at or below their run's highest stored heartbeat seq.
pub(super) async fn stored_count(
    store: &Store,
    target_id: Uuid,
    attempt: u32,
    heartbeats: &[(AgentInstance, u64)],
) -> Result<u64> {
    if heartbeats.is_empty() {
        return Ok(0);
    }
    let highest: HashMap<i64, i64> = agent_heartbeats::Entity::find()
        .select_only()
        .column(agent_heartbeats::Column::AgentInstance)
        .column(agent_heartbeats::Column::LastSeq)
        .filter(agent_heartbeats::Column::TargetId.eq(target_id))
        .filter(agent_heartbeats::Column::Attempt.eq(attempt as i32))
        .into_tuple::<(i64, i64)>()
        .all(&store.db)
        .await?
        .into_iter()
        .collect();
    Ok(heartbeats
        .iter()
        .filter(|(instance, seq)| highest.get(&instance.to_column()).is_some_and(|last| *seq <= *last as u64))
        .count() as u64)
}

impl Store {
    /// The heartbeats of each agent run of the target, oldest run first.
    pub async fn heartbeats(&self, target_id: Uuid) -> Result<Vec<HeartbeatSummary>> {
        use agent_heartbeats::Column;
        Ok(agent_heartbeats::Entity::find()
            .filter(Column::TargetId.eq(target_id))
            .order_by_asc(Column::Attempt)
            .order_by_asc(Column::FirstReceivedAt)
            .order_by_asc(Column::AgentInstance)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| HeartbeatSummary {
                attempt: m.attempt as u32,
                agent_instance: AgentInstance::from_column(m.agent_instance),
                count: m.count as u64,
                last_seq: m.last_seq as u64,
                patch_index: m.patch_index.map(|i| i as u32),
                first_received_at: m.first_received_at,
                last_received_at: m.last_received_at,
            })
            .collect())
    }
}
