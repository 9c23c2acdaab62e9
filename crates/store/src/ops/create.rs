//! A new rollout: its row, its patches, its targets (in chunks, as the
//! caller has them; on PostgreSQL as arrays in one statement per chunk) and
//! the outbox message that asks the scheduler to dispatch it, in one
//! transaction.

use super::intake::pg_array;
use super::*;

/// Targets per statement on PostgreSQL: 12 arrays of this length each.
const PG_TARGETS_CHUNK: usize = 10_000;

impl Store {
    /// Stores a new rollout (running) and asks the scheduler to dispatch it.
    pub async fn create_rollout(&self, new: NewRollout) -> Result<Uuid> {
        self.begin_rollout(new).await?.commit().await
    }

    /// Starts a new rollout's transaction: its row, its patches and the
    /// targets `new` already holds. More targets follow through
    /// [`RolloutIntake::add_targets`], in chunks, so a caller that parses a
    /// large body as it reads it never holds every target at once. Nothing
    /// is visible before [`RolloutIntake::commit`]; an intake dropped
    /// before it rolls back.
    pub async fn begin_rollout(&self, mut new: NewRollout) -> Result<RolloutIntake> {
        let id = Uuid::new_v4();
        let at = self.now();
        let mut settings = new.settings.clone();
        settings.schedule.groups.clear();
        for window in &settings.schedule.windows {
            window.check().map_err(|error| Error::Invalid(format!("window {window}: {error}")))?;
        }
        let txn = self.begin().await?;
        rollouts::Entity::insert(rollouts::ActiveModel {
            id: Set(id),
            name: Set(new.name.clone()),
            state: Set(RolloutState::Running.as_str().into()),
            pause_reason: Set(None),
            current_wave: Set(0),
            concurrency: Set(new.concurrency as i32),
            timeout_seconds: Set(new.timeout_seconds as i32),
            waves: Set(to_json(&new.waves)),
            settings: Set(to_json(&settings)),
            created_at: Set(at),
            updated_at: Set(at),
            completed_at: Set(None),
            next_window_at: Set(None),
            dispatch_wave: Set(0),
            dispatch_ordinal: Set(0),
        })
        .exec_without_returning(&txn)
        .await?;
        if !new.patches.is_empty() {
            let rows = new.patches.iter().enumerate().map(|(index, p)| patches::ActiveModel {
                rollout_id: Set(id),
                patch_index: Set(index as i32),
                name: Set(p.name.clone()),
                kb: Set(p.kb.clone()),
                file: Set(p.file.clone()),
                sha256: Set(p.sha256.clone()),
                size: Set(p.size as i64),
                installer: Set(p.installer.as_str().into()),
                arguments: Set(p.arguments.clone()),
                success_codes: Set(to_json(&p.success_codes)),
                reboot_codes: Set(to_json(&p.reboot_codes)),
                timeout_seconds: Set(p.timeout_seconds as i32),
                detection: Set(p.detection.as_ref().map(to_json)),
            });
            patches::Entity::insert_many(rows).exec_without_returning(&txn).await?;
        }
        let targets = std::mem::take(&mut new.targets);
        let mut intake = RolloutIntake {
            txn,
            id,
            at,
            settings,
            timeout_seconds: new.timeout_seconds,
            backend: self.backend(),
            next_ordinal: 0,
        };
        intake.add_targets(&targets).await?;
        Ok(intake)
    }
}

/// A rollout being created: one open transaction that takes its targets in
/// chunks ([`Store::begin_rollout`]).
pub struct RolloutIntake {
    txn: DatabaseTransaction,
    id: Uuid,
    at: DateTime<Utc>,
    settings: RolloutSettings,
    timeout_seconds: u32,
    backend: DbBackend,
    /// The ordinal of the next target: the order targets arrive in is the
    /// order they are dispatched in.
    next_ordinal: usize,
}

impl RolloutIntake {
    /// The rollout's id (not visible to others before [`Self::commit`]).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// Targets added so far.
    pub fn targets(&self) -> usize {
        self.next_ordinal
    }

    /// Adds the next targets, after those already added. Each target's set
    /// of maintenance windows comes from its labels; a label set that no
    /// window covers is refused ([`Error::Invalid`], naming the target by
    /// its index in the rollout).
    pub async fn add_targets(&mut self, targets: &[NewTarget]) -> Result<()> {
        if targets.is_empty() {
            return Ok(());
        }
        let first = self.next_ordinal;
        if first + targets.len() > i32::MAX as usize {
            return Err(Error::Invalid(format!("more than {} targets in one rollout", i32::MAX)));
        }
        let groups = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                self.settings
                    .schedule
                    .assign_group(&t.labels)
                    .map_err(|error| Error::Invalid(format!("targets[{}]: {error}", first + i)))
            })
            .collect::<Result<Vec<Option<u32>>>>()?;
        if self.backend == DbBackend::Postgres {
            for (index, chunk) in targets.chunks(PG_TARGETS_CHUNK).enumerate() {
                let offset = index * PG_TARGETS_CHUNK;
                let groups = &groups[offset..offset + chunk.len()];
                let statement =
                    targets_statement(self.id, first + offset, chunk, groups, self.timeout_seconds, self.at);
                self.txn.execute(statement).await?;
            }
        } else {
            insert_targets_portable(&self.txn, self.id, first, targets, &groups, self.timeout_seconds, self.at).await?;
        }
        self.next_ordinal += targets.len();
        Ok(())
    }

    /// Asks the scheduler to dispatch the rollout and makes it visible.
    /// Refuses a rollout without targets ([`Error::Invalid`]).
    pub async fn commit(self) -> Result<Uuid> {
        if self.next_ordinal == 0 {
            return Err(Error::Invalid("a rollout needs at least one target".into()));
        }
        if !self.settings.schedule.groups.is_empty() {
            // The sets of windows the targets met, known only now.
            rollouts::Entity::update_many()
                .col_expr(rollouts::Column::Settings, Expr::value(to_json(&self.settings)))
                .filter(rollouts::Column::Id.eq(self.id))
                .exec(&self.txn)
                .await?;
        }
        push_outbox(&self.txn, self.at, vec![dispatch_message(self.id)]).await?;
        self.txn.commit().await?;
        Ok(self.id)
    }
}

/// Targets per multi-row INSERT on SQLite: a target row binds 33 values,
/// and SQLite takes at most 32,766 per statement (so [`INSERT_CHUNK`]'s
/// 1,000 rows failed with "too many SQL variables").
const PORTABLE_TARGETS_CHUNK: usize = 500;

/// Any backend (SQLite): multi-row INSERTs of [`PORTABLE_TARGETS_CHUNK`] targets.
async fn insert_targets_portable(
    txn: &DatabaseTransaction,
    id: Uuid,
    first: usize,
    targets: &[NewTarget],
    window_groups: &[Option<u32>],
    timeout_seconds: u32,
    at: DateTime<Utc>,
) -> Result<()> {
    for (chunk_index, chunk) in targets.chunks(PORTABLE_TARGETS_CHUNK).enumerate() {
        let rows = chunk.iter().enumerate().map(|(i, t)| targets::ActiveModel {
            id: Set(Uuid::now_v7()),
            rollout_id: Set(id),
            ordinal: Set((first + chunk_index * PORTABLE_TARGETS_CHUNK + i) as i32),
            window_group: Set(window_groups[chunk_index * PORTABLE_TARGETS_CHUNK + i].map(|g| g as i32)),
            host: Set(t.host.clone()),
            port: Set(t.port.map(i32::from)),
            transport: Set(t.transport.clone()),
            labels: Set(to_json(&t.labels)),
            credential: Set(t.credential.clone()),
            wave: Set(t.wave as i32),
            state: Set(TargetState::Pending.as_str().into()),
            attempt: Set(1),
            r#try: Set(0),
            token_hash: Set(None),
            token_nonce: Set(None),
            timeout_seconds: Set(timeout_seconds as i32),
            last_seen_at: Set(None),
            error: Set(None),
            os: Set(None),
            arch: Set(None),
            probe: Set(None),
            queued_at: Set(None),
            running_at: Set(None),
            finished_at: Set(None),
            verified_state: Set(None),
            verified_at: Set(None),
            offline_until: Set(None),
            next_check_at: Set(None),
            reboot_until: Set(None),
            went_down_at: Set(None),
            delivery: Set(None),
            created_at: Set(at),
            updated_at: Set(at),
        });
        targets::Entity::insert_many(rows).exec_without_returning(txn).await?;
    }
    Ok(())
}

/// PostgreSQL: one chunk of targets as arrays, unnested into rows by one
/// statement whose text never changes (parsed and planned once per
/// connection). Building sea-orm's multi-row INSERT took most of a large
/// rollout's creation time (see README, "Performance").
fn targets_statement(
    rollout_id: Uuid,
    first: usize,
    chunk: &[NewTarget],
    groups: &[Option<u32>],
    timeout_seconds: u32,
    at: DateTime<Utc>,
) -> sea_orm::Statement {
    use sea_orm::sea_query::ArrayType;
    let values = vec![
        rollout_id.into(),
        (timeout_seconds as i32).into(),
        at.into(),
        pg_array(ArrayType::Uuid, chunk.iter().map(|_| Uuid::now_v7())),
        pg_array(ArrayType::Int, (0..chunk.len()).map(|i| (first + i) as i32)),
        pg_array(ArrayType::Bool, groups.iter().map(Option::is_some)),
        pg_array(ArrayType::Int, groups.iter().map(|g| g.unwrap_or(0) as i32)),
        pg_array(ArrayType::String, chunk.iter().map(|t| t.host.clone())),
        pg_array(ArrayType::Bool, chunk.iter().map(|t| t.port.is_some())),
        pg_array(ArrayType::Int, chunk.iter().map(|t| i32::from(t.port.unwrap_or(0)))),
        pg_array(ArrayType::String, chunk.iter().map(|t| t.transport.clone())),
        pg_array(ArrayType::String, chunk.iter().map(|t| to_json(&t.labels).to_string())),
        pg_array(ArrayType::Bool, chunk.iter().map(|t| t.credential.is_some())),
        pg_array(ArrayType::String, chunk.iter().map(|t| t.credential.clone().unwrap_or_default())),
        pg_array(ArrayType::Int, chunk.iter().map(|t| t.wave as i32)),
    ];
    sea_orm::Statement::from_sql_and_values(DbBackend::Postgres, TARGETS_SQL, values)
}

const TARGETS_SQL: &str = "INSERT INTO targets (id, rollout_id, ordinal, window_group, host, port, transport, labels, \
     credential, wave, state, attempt, try, timeout_seconds, created_at, updated_at) \
     SELECT t.id, $1, t.ordinal, CASE WHEN t.has_group THEN t.grp END, t.host, CASE WHEN t.has_port THEN t.port END, \
     t.transport, t.labels::json, CASE WHEN t.has_credential THEN t.credential END, t.wave, 'pending', 1, 0, $2, $3, $3 \
     FROM UNNEST($4::uuid[], $5::int[], $6::bool[], $7::int[], $8::text[], $9::bool[], $10::int[], $11::text[], \
     $12::text[], $13::bool[], $14::text[], $15::int[]) \
     AS t(id, ordinal, has_group, grp, host, has_port, port, transport, labels, has_credential, credential, wave)";
