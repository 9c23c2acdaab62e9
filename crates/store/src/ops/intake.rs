//! The collector's intake: authenticated reports applied in batches,
//! idempotent by (target, attempt, agent instance, seq).

use super::*;
use fleetpatch_proto::plan::RebootPolicy;

/// The collector's capability on the store: the only way to read agents'
/// credentials and to apply their reports. The scheduler, the workers and
/// the CLI hold a [`Store`] and never call [`Store::report_intake`]; the
/// architecture test (`tests/tests/architecture.rs`) checks that only the
/// collector (and the store's own tests and benches) does.
#[derive(Clone)]
pub struct ReportIntake {
    store: Store,
    heartbeat_events: HeartbeatEvents,
}

impl Store {
    /// The report intake, for the collector: heartbeats kept as a summary
    /// per agent run ([`HeartbeatEvents::Summary`]).
    pub fn report_intake(&self) -> ReportIntake {
        ReportIntake { store: self.clone(), heartbeat_events: HeartbeatEvents::Summary }
    }
}

impl ReportIntake {
    /// Whether every heartbeat is also kept as an event row
    /// (`collector.heartbeat_events`).
    pub fn with_heartbeat_events(mut self, heartbeat_events: HeartbeatEvents) -> Self {
        self.heartbeat_events = heartbeat_events;
        self
    }

    fn now(&self) -> DateTime<Utc> {
        self.store.now()
    }

    fn backend(&self) -> DbBackend {
        self.store.backend()
    }

    async fn begin(&self) -> Result<DatabaseTransaction> {
        self.store.begin().await
    }

    /// What the collector needs to authenticate a target's agent: the
    /// current attempt, the nonce its token was derived with, the token's
    /// hash and the target's state (a final state ends the attempt's key).
    pub async fn token_info(&self, target_id: Uuid) -> Result<Option<TokenInfo>> {
        Ok(self.token_infos(&[target_id]).await?.remove(&target_id))
    }

    /// [`ReportIntake::token_info`] of many targets in one read (the
    /// collector's look-ups that missed its cache together); a target that
    /// is unknown or has no token yet is absent from the answer.
    pub async fn token_infos(&self, target_ids: &[Uuid]) -> Result<HashMap<Uuid, TokenInfo>> {
        /// id, token hash, token nonce, attempt, rollout, state
        type Row = (Uuid, Option<String>, Option<String>, i32, Uuid, String);
        let mut infos = HashMap::with_capacity(target_ids.len());
        for chunk in target_ids.chunks(INSERT_CHUNK) {
            let rows: Vec<Row> = targets::Entity::find()
                .select_only()
                .column(targets::Column::Id)
                .column(targets::Column::TokenHash)
                .column(targets::Column::TokenNonce)
                .column(targets::Column::Attempt)
                .column(targets::Column::RolloutId)
                .column(targets::Column::State)
                .filter(id_in(self.backend(), targets::Column::Id, chunk.iter().copied()))
                .into_tuple()
                .all(&self.store.db)
                .await?;
            for (id, token_hash, token_nonce, attempt, rollout_id, state) in rows {
                let Some(token_hash) = token_hash else { continue };
                let state = state.parse::<TargetState>().map_err(|e| Error::Corrupt(e.to_string()))?;
                let token_nonce = token_nonce.unwrap_or_default();
                infos.insert(id, TokenInfo { token_hash, token_nonce, attempt: attempt as u32, rollout_id, state });
            }
        }
        Ok(infos)
    }

    /// Whether the agent's final result of `attempt` is stored (the
    /// collector stops accepting the attempt's key after it).
    pub async fn final_reported(&self, target_id: Uuid, attempt: u32) -> Result<bool> {
        Ok(agent_events::Entity::find()
            .filter(agent_events::Column::TargetId.eq(target_id))
            .filter(agent_events::Column::Attempt.eq(attempt as i32))
            .filter(agent_events::Column::Kind.eq("final"))
            .count(&self.store.db)
            .await?
            > 0)
    }

    /// How many of `reports` of `attempt` are stored: an event by its
    /// (agent instance, seq), a heartbeat when its seq is at or below its
    /// run's highest stored heartbeat. The collector answers a closed
    /// attempt's retry of reports it already stored (its answer was lost)
    /// as duplicates, not as late reports.
    pub async fn stored_report_count(&self, target_id: Uuid, attempt: u32, reports: &[SentReport]) -> Result<u64> {
        let (beats, events): (Vec<_>, Vec<_>) = reports.iter().partition(|r| r.heartbeat);
        let key = |reports: Vec<&SentReport>| -> Vec<(AgentInstance, u64)> {
            reports.into_iter().map(|r| (r.agent_instance, r.seq)).collect()
        };
        let (beats, events) = (key(beats), key(events));
        let stored_beats = heartbeats::stored_count(&self.store, target_id, attempt, &beats).await?;
        Ok(stored_beats + self.stored_event_count(target_id, attempt, &events).await?)
    }

    async fn stored_event_count(&self, target_id: Uuid, attempt: u32, reports: &[(AgentInstance, u64)]) -> Result<u64> {
        if reports.is_empty() {
            return Ok(0);
        }
        let wanted: HashSet<(AgentInstance, u64)> = reports.iter().copied().collect();
        let stored: Vec<(i64, i64)> = agent_events::Entity::find()
            .select_only()
            .column(agent_events::Column::AgentInstance)
            .column(agent_events::Column::Seq)
            .filter(agent_events::Column::TargetId.eq(target_id))
            .filter(agent_events::Column::Attempt.eq(attempt as i32))
            .filter(
                agent_events::Column::Seq.is_in(wanted.iter().map(|(_, seq)| i64::try_from(*seq).unwrap_or(i64::MAX))),
            )
            .into_tuple()
            .all(&self.store.db)
            .await?;
        Ok(stored
            .into_iter()
            .filter(|(instance, seq)| wanted.contains(&(AgentInstance::from_column(*instance), *seq as u64)))
            .count() as u64)
    }

    /// Applies a batch of authenticated reports in one transaction:
    /// idempotent by (target, attempt, agent instance, seq); every new report moves the
    /// target's deadline (its stored last-seen time once per 1 % of its
    /// timeout, see [`last_seen`]); patch results and
    /// the final result are recorded with guarded updates. A report whose
    /// target is not in the store is not stored
    /// ([`ReportResult::UnknownTarget`]) and does not hold up the others.
    pub async fn apply_reports(&self, reports: &[IncomingReport]) -> Result<Vec<ReportResult>> {
        if reports.is_empty() {
            return Ok(vec![]);
        }
        let received_at = self.now();
        let mut seen_in_batch = HashSet::new();
        let unique: Vec<&IncomingReport> = reports.iter().filter(|r| seen_in_batch.insert(ReportKey::of(r))).collect();
        let txn = self.begin().await?;
        let (mut fresh, unknown) = if self.backend() == DbBackend::Postgres {
            let (events, beats) = self.split_heartbeats(unique);
            apply_reports_postgres(&txn, &events, &beats, received_at).await?
        } else {
            let known = known_targets(&txn, &unique).await?;
            let (kept, left): (Vec<&IncomingReport>, Vec<&IncomingReport>) =
                unique.into_iter().partition(|r| known.contains(&r.target_id));
            let (events, beats) = self.split_heartbeats(kept);
            let fresh = apply_reports_portable(&txn, self.backend(), &events, &beats, received_at).await?;
            (fresh, left.into_iter().map(|r| r.target_id).collect())
        };
        txn.commit().await?;
        Ok(reports
            .iter()
            .map(|r| {
                if unknown.contains(&r.target_id) {
                    ReportResult::UnknownTarget
                } else if fresh.remove(&ReportKey::of(r)) {
                    ReportResult::Accepted
                } else {
                    ReportResult::Duplicate
                }
            })
            .collect())
    }

    /// The batch's reports stored as events, and its heartbeats (which are
    /// events too with [`HeartbeatEvents::Every`]).
    fn split_heartbeats<'a>(
        &self,
        unique: Vec<&'a IncomingReport>,
    ) -> (Vec<&'a IncomingReport>, Vec<&'a IncomingReport>) {
        let is_beat = |r: &&IncomingReport| matches!(r.kind, ReportKind::Heartbeat { .. });
        let beats: Vec<&IncomingReport> = unique.iter().copied().filter(is_beat).collect();
        let events = match self.heartbeat_events {
            HeartbeatEvents::Every => unique,
            HeartbeatEvents::Summary => unique.into_iter().filter(|r| !is_beat(r)).collect(),
        };
        (events, beats)
    }
}

/// Which of the reports' targets are in the store (`agent_events` has no
/// foreign key to `targets` since migration 16: this read keeps a report of
/// an unknown target out of it). One look-up of the batch's distinct
/// targets, in the batch's transaction; on PostgreSQL the batch statement
/// does the same (`known`).
async fn known_targets(txn: &DatabaseTransaction, reports: &[&IncomingReport]) -> Result<HashSet<Uuid>> {
    let mut ids: Vec<Uuid> = reports.iter().map(|r| r.target_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut known = HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(INSERT_CHUNK) {
        let found: Vec<Uuid> = targets::Entity::find()
            .select_only()
            .column(targets::Column::Id)
            .filter(id_in(txn.get_database_backend(), targets::Column::Id, chunk.iter().copied()))
            .into_tuple()
            .all(txn)
            .await?;
        known.extend(found);
    }
    Ok(known)
}

/// PostgreSQL: the events, the heartbeats' summaries, the targets'
/// last-seen times and the patch results of the whole batch in one
/// statement whose text never changes (the reports travel as arrays),
/// then the final results' statements, in one transaction.
///
/// The transaction plans with `plan_cache_mode = force_generic_plan`
/// (`SET LOCAL`: this transaction only, not the pooled connection's
/// other users): left to choose, PostgreSQL planned the batch statement
/// afresh at every execution (a custom plan for the arrays' lengths),
/// about 1 ms of its CPU each time (`pg_stat_statements`: 16,143 plans
/// in 16,562 calls, 16.7 s of planning; with the setting 40 plans, 0.1 s).
async fn apply_reports_postgres(
    txn: &DatabaseTransaction,
    unique: &[&IncomingReport],
    beats: &[&IncomingReport],
    received_at: DateTime<Utc>,
) -> Result<(HashSet<ReportKey>, HashSet<Uuid>)> {
    let statement = intake_statement(unique, beats, received_at);
    txn.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan").await?;
    let (fresh, unknown) = stored_and_unknown(txn.query_all(statement).await?)?;
    let finals: Vec<&IncomingReport> = unique
        .iter()
        .copied()
        .filter(|r| matches!(r.kind, ReportKind::Final { .. }) && fresh.contains(&ReportKey::of(r)))
        .collect();
    for chunk in finals.chunks(INSERT_CHUNK) {
        apply_final_results(txn, chunk, received_at).await?;
    }
    Ok((fresh, unknown))
}

/// Any backend (SQLite): a few statements per batch in the batch's transaction.
async fn apply_reports_portable(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    unique: &[&IncomingReport],
    beats: &[&IncomingReport],
    received_at: DateTime<Utc>,
) -> Result<HashSet<ReportKey>> {
    let mut fresh: HashSet<ReportKey> = HashSet::new();
    for chunk in unique.chunks(INSERT_CHUNK) {
        let mut insert = Query::insert();
        insert.into_table(agent_events::Entity).columns([
            agent_events::Column::TargetId,
            agent_events::Column::Attempt,
            agent_events::Column::AgentInstance,
            agent_events::Column::Seq,
            agent_events::Column::Kind,
            agent_events::Column::PatchIndex,
            agent_events::Column::ExitCode,
            agent_events::Column::Detail,
            agent_events::Column::SentAt,
            agent_events::Column::ReceivedAt,
        ]);
        for report in chunk {
            let event = EventColumns::of(report);
            insert.values_panic([
                report.target_id.into(),
                (report.attempt as i32).into(),
                report.agent_instance.to_column().into(),
                (report.seq as i64).into(),
                event.kind.into(),
                event.patch_index.into(),
                event.exit_code.into(),
                event.detail.into(),
                report.sent_at.into(),
                received_at.into(),
            ]);
        }
        insert.on_conflict(
            OnConflict::columns([
                agent_events::Column::TargetId,
                agent_events::Column::Attempt,
                agent_events::Column::AgentInstance,
                agent_events::Column::Seq,
            ])
            .do_nothing()
            .to_owned(),
        );
        insert.returning(Query::returning().columns([
            agent_events::Column::TargetId,
            agent_events::Column::Attempt,
            agent_events::Column::AgentInstance,
            agent_events::Column::Seq,
        ]));
        let statement = backend.build(&insert);
        fresh.extend(fresh_keys(txn.query_all(statement).await?)?);
    }
    fresh.extend(heartbeats::apply_portable(txn, beats, received_at).await?);
    // Every fresh report resets its target's deadline (its stored
    // last-seen time once per step, see [`last_seen`]).
    let touched: Vec<Uuid> = {
        let mut ids: Vec<Uuid> = fresh.iter().map(|key| key.target_id).collect();
        ids.sort();
        ids.dedup();
        ids
    };
    last_seen::touch_portable(txn, &touched, received_at).await?;
    let accepted: Vec<&IncomingReport> = unique.iter().copied().filter(|r| fresh.contains(&ReportKey::of(r))).collect();
    // Patch results first, then the final results (which fail the patches
    // left open, so they come last).
    for report in &accepted {
        apply_patch_report(txn, report, received_at).await?;
    }
    let finals: Vec<&IncomingReport> =
        accepted.iter().copied().filter(|r| matches!(r.kind, ReportKind::Final { .. })).collect();
    for chunk in finals.chunks(INSERT_CHUNK) {
        apply_final_results(txn, chunk, received_at).await?;
    }
    Ok(fresh)
}

/// How a report is stored in `agent_events`.
struct EventColumns {
    kind: &'static str,
    patch_index: Option<i32>,
    exit_code: Option<i32>,
    detail: Option<String>,
}

impl EventColumns {
    fn of(report: &IncomingReport) -> Self {
        let (kind, patch_index, exit_code, detail) = match &report.kind {
            ReportKind::Started { patch_index } => ("started", Some(*patch_index as i32), None, None),
            ReportKind::Finished { patch_index, exit_code, outcome, .. } => {
                ("finished", Some(*patch_index as i32), Some(*exit_code), Some(outcome.as_str().to_owned()))
            }
            ReportKind::Heartbeat { patch_index } => ("heartbeat", patch_index.map(|i| i as i32), None, None),
            ReportKind::Final { success, message, .. } => {
                ("final", None, None, Some(format!("{}: {message}", if *success { "success" } else { "failure" })))
            }
        };
        Self { kind, patch_index, exit_code, detail }
    }
}

/// What makes a report unique: a resent report has the same key; a second
/// agent run of the same attempt has another instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct ReportKey {
    target_id: Uuid,
    attempt: u32,
    agent_instance: AgentInstance,
    seq: u64,
}

impl ReportKey {
    pub(super) fn of(report: &IncomingReport) -> Self {
        Self {
            target_id: report.target_id,
            attempt: report.attempt,
            agent_instance: report.agent_instance,
            seq: report.seq,
        }
    }
}

/// The PostgreSQL batch statement's answer: the fresh reports' keys
/// (`stored`) and the targets the store does not have.
fn stored_and_unknown(rows: Vec<sea_orm::QueryResult>) -> Result<(HashSet<ReportKey>, HashSet<Uuid>)> {
    let (mut stored, mut unknown) = (Vec::with_capacity(rows.len()), HashSet::new());
    for row in rows {
        if row.try_get::<bool>("", "stored")? {
            stored.push(row);
        } else {
            unknown.insert(row.try_get::<Uuid>("", "target_id")?);
        }
    }
    Ok((fresh_keys(stored)?, unknown))
}

/// The keys of the events an insert's `RETURNING` names: the fresh reports
/// of a batch.
fn fresh_keys(rows: Vec<sea_orm::QueryResult>) -> Result<HashSet<ReportKey>> {
    let mut fresh = HashSet::with_capacity(rows.len());
    for row in rows {
        let target_id: Uuid = row.try_get("", "target_id")?;
        let attempt: i32 = row.try_get("", "attempt")?;
        let agent_instance: i64 = row.try_get("", "agent_instance")?;
        let seq: i64 = row.try_get("", "seq")?;
        fresh.insert(ReportKey {
            target_id,
            attempt: attempt as u32,
            agent_instance: AgentInstance::from_column(agent_instance),
            seq: seq as u64,
        });
    }
    Ok(fresh)
}

/// What a batch's reports do to one patch of one attempt: whether it was
/// started, and its first result (exit code, outcome, output tail).
struct PatchEffect<'a> {
    key: (Uuid, u32, u32),
    started: bool,
    finished: Option<(i32, PatchOutcomeKind, &'a str)>,
}

/// The batch's `started` and `finished` reports, merged per (target,
/// attempt, patch) in the order they first appear.
fn patch_effects<'a>(unique: &[&'a IncomingReport]) -> Vec<PatchEffect<'a>> {
    let mut effects: Vec<PatchEffect> = Vec::new();
    let mut effect_at: HashMap<(Uuid, u32, u32), usize> = HashMap::new();
    for report in unique {
        let (patch_index, finished) = match &report.kind {
            ReportKind::Started { patch_index } => (*patch_index, None),
            ReportKind::Finished { patch_index, exit_code, outcome, output_tail } => {
                (*patch_index, Some((*exit_code, *outcome, output_tail.as_str())))
            }
            ReportKind::Heartbeat { .. } | ReportKind::Final { .. } => continue,
        };
        let key = (report.target_id, report.attempt, patch_index);
        let at = *effect_at.entry(key).or_insert_with(|| {
            effects.push(PatchEffect { key, started: false, finished: None });
            effects.len() - 1
        });
        let effect = &mut effects[at];
        match finished {
            None => effect.started = true,
            Some(result) => {
                effect.finished.get_or_insert(result);
            }
        }
    }
    effects
}

/// A PostgreSQL array parameter (arrays hold no NULLs here: optional
/// columns travel with a `has_…` array beside them).
pub(crate) fn pg_array<T: Into<sea_orm::Value>>(
    kind: sea_orm::sea_query::ArrayType,
    items: impl IntoIterator<Item = T>,
) -> sea_orm::Value {
    sea_orm::Value::Array(kind, Some(Box::new(items.into_iter().map(Into::into).collect())))
}

/// The text of [`intake_statement`], built once.
static INTAKE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let in_flight = in_flight_sql();
    let closing = states_sql(&FINAL_FROM);
    let finishes = format!("(e.finished AND tp.state IN ('pending', 'running') AND t.state IN ({in_flight}))");
    let starts = "(e.started AND tp.state = 'pending')";
    format!(
        "WITH incoming AS ( \
             SELECT * FROM unnest($2::uuid[], $3::int[], $4::bigint[], $5::text[], $6::bool[], $7::int[], \
                                  $8::bool[], $9::int[], $10::bool[], $11::text[], $12::bool[], $13::timestamptz[], \
                                  $24::bigint[]) \
             AS i(target_id, attempt, seq, kind, has_patch, patch_index, has_exit, exit_code, \
                  has_detail, detail, has_sent, sent_at, agent_instance) \
         ), {heartbeat_input}, known AS MATERIALIZED ( \
             SELECT id FROM targets WHERE id IN (SELECT target_id FROM incoming UNION SELECT target_id FROM hb_in) \
         ), fresh AS ( \
             INSERT INTO agent_events (target_id, attempt, agent_instance, seq, kind, patch_index, exit_code, detail, \
                                       sent_at, received_at) \
             SELECT target_id, attempt, agent_instance, seq, kind, CASE WHEN has_patch THEN patch_index END, \
                    CASE WHEN has_exit THEN exit_code END, CASE WHEN has_detail THEN detail END, \
                    CASE WHEN has_sent THEN sent_at END, $1 \
             FROM incoming WHERE target_id IN (SELECT id FROM known) \
             ON CONFLICT (target_id, attempt, agent_instance, seq) DO NOTHING \
             RETURNING target_id, attempt, agent_instance, seq \
         ), {heartbeats}, touched AS ( \
             UPDATE targets SET last_seen_at = $1 \
             WHERE id IN (SELECT target_id FROM fresh UNION ALL SELECT target_id FROM hb_fresh) \
                   AND state IN ({in_flight}) AND {stale} \
                   AND NOT (state IN ({closing}) \
                            AND (id, attempt) IN (SELECT * FROM unnest($31::uuid[], $32::int[]))) \
         ), effects AS ( \
             SELECT * FROM unnest($14::uuid[], $15::int[], $16::int[], $17::bool[], $18::bool[], $19::text[], \
                                  $20::int[], $21::text[], $22::bool[], $23::text[]) \
             AS e(target_id, attempt, patch_index, started, finished, state, exit_code, outcome, reboot, tail) \
         ), patched AS ( \
             UPDATE target_patches AS tp SET \
                 state = CASE WHEN {finishes} THEN e.state ELSE 'running' END, \
                 started_at = CASE WHEN {starts} THEN $1 ELSE tp.started_at END, \
                 exit_code = CASE WHEN {finishes} THEN e.exit_code ELSE tp.exit_code END, \
                 outcome = CASE WHEN {finishes} THEN e.outcome ELSE tp.outcome END, \
                 reboot_required = CASE WHEN {finishes} THEN e.reboot ELSE tp.reboot_required END, \
                 output_tail = CASE WHEN {finishes} THEN e.tail ELSE tp.output_tail END, \
                 finished_at = CASE WHEN {finishes} THEN $1 ELSE tp.finished_at END \
             FROM effects AS e JOIN targets AS t ON t.id = e.target_id AND t.attempt = e.attempt \
             WHERE tp.target_id = e.target_id AND tp.patch_index = e.patch_index AND ({finishes} OR {starts}) \
         ) \
         SELECT true AS stored, target_id, attempt, agent_instance, seq FROM fresh \
         UNION ALL SELECT true, target_id, attempt, agent_instance, seq FROM hb_fresh \
         UNION ALL SELECT false, u.target_id, 0, 0, 0 FROM \
             (SELECT target_id FROM incoming UNION SELECT target_id FROM hb_in) AS u \
             WHERE u.target_id NOT IN (SELECT id FROM known)",
        stale = last_seen::postgres_stale(),
        heartbeat_input = heartbeats::POSTGRES_INPUT,
        heartbeats = heartbeats::POSTGRES_CTES,
    )
});

/// The one statement of [`Store::apply_reports`] on PostgreSQL: inserts the
/// events (idempotent by (target, attempt, agent instance, seq)) and the
/// heartbeats' summaries (see [`heartbeats`]), returns the fresh ones,
/// moves the last-seen time of the targets that sent one where it is a
/// step old (see [`last_seen`]; but those whose final result's move sets
/// it, see [`FINAL_FROM`]), and applies the
/// batch's `started` and `finished` reports to their patches.
///
/// The patch results are merged per (target, attempt, patch) first: two
/// updates of one row in one statement would leave only one of them. The
/// merged update does what the two in sequence did: `started` moves a
/// pending patch to running (reporting attempt only); `finished` (the first
/// in the batch) records the result of a pending or running patch while its
/// target is in flight in the reporting attempt. Reports that turn out to be
/// duplicates change nothing through it: every guard is on the patch's
/// current state, which they already moved.
fn intake_statement(
    unique: &[&IncomingReport],
    beats: &[&IncomingReport],
    received_at: DateTime<Utc>,
) -> sea_orm::Statement {
    use sea_orm::sea_query::ArrayType;
    let events: Vec<EventColumns> = unique.iter().map(|r| EventColumns::of(r)).collect();
    let effects = patch_effects(unique);
    let results = || effects.iter().map(|e| e.finished);
    let patch_state = |outcome: PatchOutcomeKind| {
        if outcome.succeeded() { PatchState::Succeeded } else { PatchState::Failed }.as_str()
    };
    let mut values = vec![
        received_at.into(),
        pg_array(ArrayType::Uuid, unique.iter().map(|r| r.target_id)),
        pg_array(ArrayType::Int, unique.iter().map(|r| r.attempt as i32)),
        pg_array(ArrayType::BigInt, unique.iter().map(|r| r.seq as i64)),
        pg_array(ArrayType::String, events.iter().map(|e| e.kind)),
        pg_array(ArrayType::Bool, events.iter().map(|e| e.patch_index.is_some())),
        pg_array(ArrayType::Int, events.iter().map(|e| e.patch_index.unwrap_or(0))),
        pg_array(ArrayType::Bool, events.iter().map(|e| e.exit_code.is_some())),
        pg_array(ArrayType::Int, events.iter().map(|e| e.exit_code.unwrap_or(0))),
        pg_array(ArrayType::Bool, events.iter().map(|e| e.detail.is_some())),
        pg_array(ArrayType::String, events.iter().map(|e| e.detail.clone().unwrap_or_default())),
        pg_array(ArrayType::Bool, unique.iter().map(|r| r.sent_at.is_some())),
        pg_array(ArrayType::ChronoDateTimeUtc, unique.iter().map(|r| r.sent_at.unwrap_or(received_at))),
        pg_array(ArrayType::Uuid, effects.iter().map(|e| e.key.0)),
        pg_array(ArrayType::Int, effects.iter().map(|e| e.key.1 as i32)),
        pg_array(ArrayType::Int, effects.iter().map(|e| e.key.2 as i32)),
        pg_array(ArrayType::Bool, effects.iter().map(|e| e.started)),
        pg_array(ArrayType::Bool, results().map(|r| r.is_some())),
        pg_array(ArrayType::String, results().map(|r| r.map_or("", |(_, outcome, _)| patch_state(outcome)))),
        pg_array(ArrayType::Int, results().map(|r| r.map_or(0, |(exit_code, _, _)| exit_code))),
        pg_array(ArrayType::String, results().map(|r| r.map_or("", |(_, outcome, _)| outcome.as_str()))),
        pg_array(
            ArrayType::Bool,
            results().map(|r| r.is_some_and(|(_, outcome, _)| outcome == PatchOutcomeKind::InstalledRebootRequired)),
        ),
        pg_array(ArrayType::String, results().map(|r| r.map_or("", |(_, _, tail)| tail))),
        pg_array(ArrayType::BigInt, unique.iter().map(|r| r.agent_instance.to_column())),
    ];
    values.extend(heartbeats::postgres_values(beats));
    let finals = || unique.iter().filter(|r| matches!(r.kind, ReportKind::Final { .. }));
    values.push(pg_array(ArrayType::Uuid, finals().map(|r| r.target_id)));
    values.push(pg_array(ArrayType::Int, finals().map(|r| r.attempt as i32)));
    sea_orm::Statement::from_sql_and_values(DbBackend::Postgres, INTAKE_SQL.as_str(), values)
}

/// A `started` or `finished` report, one statement (SQLite; PostgreSQL
/// merges them into the batch's one statement, see [`intake_statement`]).
async fn apply_patch_report(txn: &DatabaseTransaction, report: &IncomingReport, at: DateTime<Utc>) -> Result<()> {
    let this_attempt = |in_flight: bool| {
        let mut query = Query::select()
            .expr(Expr::value(1))
            .from(targets::Entity)
            .and_where(Expr::col((targets::Entity, targets::Column::Id)).eq(report.target_id))
            .and_where(Expr::col((targets::Entity, targets::Column::Attempt)).eq(report.attempt as i32))
            .to_owned();
        if in_flight {
            query.and_where(
                Expr::col((targets::Entity, targets::Column::State)).is_in(state_strs(&TargetState::IN_FLIGHT)),
            );
        }
        Expr::exists(query)
    };
    match &report.kind {
        ReportKind::Started { patch_index } => {
            target_patches::Entity::update_many()
                .col_expr(target_patches::Column::State, Expr::value(PatchState::Running.as_str()))
                .col_expr(target_patches::Column::StartedAt, Expr::value(at))
                .filter(target_patches::Column::TargetId.eq(report.target_id))
                .filter(target_patches::Column::PatchIndex.eq(*patch_index as i32))
                .filter(target_patches::Column::State.eq(PatchState::Pending.as_str()))
                .filter(this_attempt(false))
                .exec(txn)
                .await?;
        }
        ReportKind::Finished { patch_index, exit_code, outcome, output_tail } => {
            let state = if outcome.succeeded() { PatchState::Succeeded } else { PatchState::Failed };
            target_patches::Entity::update_many()
                .col_expr(target_patches::Column::State, Expr::value(state.as_str()))
                .col_expr(target_patches::Column::ExitCode, Expr::value(*exit_code))
                .col_expr(target_patches::Column::Outcome, Expr::value(outcome.as_str()))
                .col_expr(
                    target_patches::Column::RebootRequired,
                    Expr::value(*outcome == PatchOutcomeKind::InstalledRebootRequired),
                )
                .col_expr(target_patches::Column::OutputTail, Expr::value(output_tail.clone()))
                .col_expr(target_patches::Column::FinishedAt, Expr::value(at))
                .filter(target_patches::Column::TargetId.eq(report.target_id))
                .filter(target_patches::Column::PatchIndex.eq(*patch_index as i32))
                .filter(
                    target_patches::Column::State.is_in([PatchState::Pending.as_str(), PatchState::Running.as_str()]),
                )
                .filter(this_attempt(true))
                .exec(txn)
                .await?;
        }
        ReportKind::Heartbeat { .. } | ReportKind::Final { .. } => {}
    }
    Ok(())
}

/// The reboot policy and timeout of each of `rollouts`.
async fn reboot_settings(
    txn: &DatabaseTransaction,
    rollouts: impl Iterator<Item = Uuid>,
) -> Result<HashMap<Uuid, (RebootPolicy, u64)>> {
    let ids: BTreeSet<Uuid> = rollouts.collect();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(Uuid, sea_orm::JsonValue)> = rollouts::Entity::find()
        .select_only()
        .column(rollouts::Column::Id)
        .column(rollouts::Column::Settings)
        .filter(id_in(txn.get_database_backend(), rollouts::Column::Id, ids))
        .into_tuple()
        .all(txn)
        .await?;
    let mut settings = HashMap::with_capacity(rows.len());
    for (id, json) in rows {
        let parsed: RolloutSettings = from_json(json, "rollout settings")?;
        settings.insert(id, (parsed.reboot, parsed.reboot_timeout_seconds));
    }
    Ok(settings)
}

/// The states a target's final result moves it from (in the reporting
/// attempt). The batch statement does not move `last_seen_at` of a target
/// in one of them whose final result of its attempt is in the batch: the
/// final result's move sets it instead. Updated twice in one transaction, a
/// target row had its foreign key to `rollouts` checked again (PostgreSQL
/// checks a key even unchanged when the row's version is the transaction's
/// own), and that check's `KEY SHARE` lock on the one `rollouts` row, held
/// by every writer finishing targets of the rollout at once, made a
/// MultiXact each time (issue 20: ~3,000 per `fleetpatch bench`, 4.6
/// members each). A final result in the batch that turns out not to apply
/// leaves its target out of flight or in another attempt, where its
/// deadline is not this report's to move.
pub(super) const FINAL_FROM: [TargetState; 4] =
    [TargetState::Probing, TargetState::Staging, TargetState::Installing, TargetState::Running];

/// The final results of a batch, a few statements for all of them: the
/// targets are locked in id order, those still in flight in the reporting
/// attempt move to succeeded or failed (the first final result per target
/// counts), with their history, their open patches failed, and one dispatch
/// request per rollout plus a cleanup job and an event per target.
async fn apply_final_results(txn: &DatabaseTransaction, finals: &[&IncomingReport], at: DateTime<Utc>) -> Result<()> {
    let mut ids: Vec<Uuid> = finals.iter().map(|r| r.target_id).collect();
    ids.sort();
    ids.dedup();
    let rows: Vec<(Uuid, Uuid, String, i32)> = targets::Entity::find()
        .select_only()
        .column(targets::Column::Id)
        .column(targets::Column::RolloutId)
        .column(targets::Column::State)
        .column(targets::Column::Attempt)
        .filter(id_in(txn.get_database_backend(), targets::Column::Id, ids))
        .order_by_asc(targets::Column::Id)
        .lock(LockType::NoKeyUpdate)
        .into_tuple()
        .all(txn)
        .await?;
    let mut current: HashMap<Uuid, (Uuid, TargetState, u32)> = HashMap::with_capacity(rows.len());
    for (id, rollout_id, state, attempt) in rows {
        current.insert(id, (rollout_id, parse(&state, "target state")?, attempt as u32));
    }
    // The reboot policy and timeout of each rollout with a successful final
    // result in this batch: those targets wait as `rebooting` for their
    // machine to come back, then for the verification scan.
    let reboots = reboot_settings(
        txn,
        finals
            .iter()
            .filter(|r| matches!(r.kind, ReportKind::Final { success: true, .. }))
            .filter_map(|r| current.get(&r.target_id).map(|c| c.0)),
    )
    .await?;
    // (target, rollout, from, to, detail)
    let mut moves: Vec<(Uuid, Uuid, TargetState, TargetState, String)> = Vec::new();
    let mut moved = HashSet::new();
    for report in finals {
        let ReportKind::Final { success, reboot_required, message } = &report.kind else { continue };
        let Some((rollout_id, state, attempt)) = current.get(&report.target_id) else { continue };
        if *attempt != report.attempt || !FINAL_FROM.contains(state) || !moved.insert(report.target_id) {
            continue;
        }
        let reboots_now = *success
            && reboots.get(rollout_id).is_some_and(|(policy, _)| match policy {
                RebootPolicy::Never => false,
                RebootPolicy::IfRequired => *reboot_required,
                RebootPolicy::Always => true,
            });
        let (to, detail) = match (*success, reboots_now) {
            (true, true) => (TargetState::Rebooting, format!("agent: {message}; the machine reboots")),
            (true, false) => (TargetState::Succeeded, format!("agent: {message}")),
            (false, _) => (TargetState::Failed, format!("agent: {message}")),
        };
        moves.push((report.target_id, *rollout_id, *state, to, detail));
    }
    if moves.is_empty() {
        return Ok(());
    }
    // One UPDATE per outcome (per failure message, usually one or two; per
    // rollout for the reboots, whose deadlines differ).
    // (state, failure message, rollout of a reboot) → its targets
    type Group<'a> = (TargetState, Option<&'a str>, Option<Uuid>);
    let mut groups: BTreeMap<Group<'_>, Vec<transition::Step>> = BTreeMap::new();
    for (target_id, rollout_id, from, to, detail) in &moves {
        let error = (*to == TargetState::Failed).then_some(detail.as_str());
        let rollout = (*to == TargetState::Rebooting).then_some(*rollout_id);
        groups.entry((*to, error, rollout)).or_default().push(transition::Step {
            target_id: *target_id,
            rollout_id: *rollout_id,
            from: *from,
            detail: Some(detail.clone()),
        });
    }
    for ((to, error, rollout), steps) in groups {
        let mut sets = match rollout.and_then(|id| reboots.get(&id)) {
            Some((_, timeout)) => super::reboot::rebooting(at, *timeout),
            None => vec![(targets::Column::FinishedAt, Expr::value(at))],
        };
        // The final result is a report too: its target was seen now. On
        // PostgreSQL the batch statement left these targets' `last_seen_at`
        // to this update (see [`FINAL_FROM`]).
        sets.push((targets::Column::LastSeenAt, Expr::value(at)));
        if let Some(error) = error {
            sets.push((targets::Column::Error, Expr::value(error)));
        }
        // Locked above and checked against FINAL_FROM.
        transition::move_locked(txn, at, to, &steps, sets).await?;
    }
    fail_open_patches(txn, moves.iter().map(|m| m.0), "the agent finished without reporting this patch", at).await?;
    let rollouts: BTreeSet<Uuid> = moves.iter().map(|m| m.1).collect();
    let mut messages: Vec<Outgoing> = rollouts.into_iter().map(dispatch_message).collect();
    for (target_id, rollout_id, from, to, detail) in &moves {
        let attempt = current.get(target_id).map(|c| c.2).unwrap_or_default();
        if *to == TargetState::Rebooting {
            // The first check at once: it finds the machine still up with
            // the same boot, or already down; the worker paces the rest.
            messages.push(super::offline::reach_message(*target_id, attempt, 1));
        } else {
            messages.push(cleanup_message(*target_id, attempt));
        }
        messages.push(event_message(*target_id, *rollout_id, *from, *to, detail, at));
    }
    push_outbox(txn, at, messages).await
}
