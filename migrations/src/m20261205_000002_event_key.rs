//! `agent_events` keyed by what makes a report unique: (target, attempt,
//! agent instance, seq) becomes the primary key, and the table loses the
//! surrogate `id` (nothing reads it: events are paged by attempt, seq and
//! instance) and the foreign key to `targets` (targets are never deleted,
//! and the collector's intake stores a report only when its target exists:
//! `ReportIntake::apply_reports` answers `ReportResult::UnknownTarget` otherwise).
//!
//! Every stored report paid for both (issue 20): a sequence's `nextval`
//! and a second B-tree insert for the `id`, and for the foreign key a
//! row trigger whose query locks the target's row (`FOR KEY SHARE`, a
//! write to the row the same statement has just updated). Measured on
//! this machine's PostgreSQL 15, 40,000 rows inserted the way the intake
//! does (`INSERT … SELECT … ON CONFLICT DO NOTHING`, three runs): 391–456
//! ms with both, 233–240 ms without the foreign key, 151–183 ms keyed by
//! the report.
//!
//! The table is rebuilt (create, copy, drop, rename): SQLite can change
//! neither a primary key nor a foreign key in place. The four statements go
//! over one connection (on SQLite a pool's other connection may hold the
//! schema from before).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AgentEvents {
    Id,
    TargetId,
    Attempt,
    AgentInstance,
    Seq,
    Kind,
    PatchIndex,
    ExitCode,
    Detail,
    SentAt,
    ReceivedAt,
}

#[derive(DeriveIden)]
enum Targets {
    Table,
    Id,
}

/// The columns both shapes have, in the order they are copied.
const COLUMNS: &str =
    "target_id, attempt, agent_instance, seq, kind, patch_index, exit_code, detail, sent_at, received_at";

/// `agent_events_new` with the columns every shape has; `extend` adds the
/// shape's own key.
fn new_table(extend: impl FnOnce(&mut TableCreateStatement)) -> TableCreateStatement {
    let mut table = Table::create();
    table
        .table(Alias::new("agent_events_new"))
        .col(ColumnDef::new(AgentEvents::TargetId).uuid().not_null())
        .col(ColumnDef::new(AgentEvents::Attempt).integer().not_null())
        .col(ColumnDef::new(AgentEvents::AgentInstance).big_integer().not_null().default(0))
        .col(ColumnDef::new(AgentEvents::Seq).big_integer().not_null())
        .col(ColumnDef::new(AgentEvents::Kind).string().not_null())
        .col(ColumnDef::new(AgentEvents::PatchIndex).integer().null())
        .col(ColumnDef::new(AgentEvents::ExitCode).integer().null())
        .col(ColumnDef::new(AgentEvents::Detail).text().null())
        .col(ColumnDef::new(AgentEvents::SentAt).timestamp_with_time_zone().null())
        .col(ColumnDef::new(AgentEvents::ReceivedAt).timestamp_with_time_zone().not_null());
    extend(&mut table);
    table.to_owned()
}

/// Replaces `agent_events` with `table` (named `agent_events_new`) and
/// its rows, then runs `after` (its indexes).
async fn rebuild(manager: &SchemaManager<'_>, table: TableCreateStatement, after: &str) -> Result<(), DbErr> {
    let create = manager.get_database_backend().build(&table).to_string();
    manager
        .get_connection()
        .execute_unprepared(&format!(
            "{create}; \
             INSERT INTO agent_events_new ({COLUMNS}) SELECT {COLUMNS} FROM agent_events; \
             DROP TABLE agent_events; \
             ALTER TABLE agent_events_new RENAME TO agent_events; {after}"
        ))
        .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let table = new_table(|table| {
            table.primary_key(
                Index::create()
                    .name("agent_events_key")
                    .col(AgentEvents::TargetId)
                    .col(AgentEvents::Attempt)
                    .col(AgentEvents::AgentInstance)
                    .col(AgentEvents::Seq),
            );
        });
        rebuild(manager, table, "").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let table = new_table(|table| {
            table
                .col(ColumnDef::new(AgentEvents::Id).big_integer().not_null().auto_increment().primary_key())
                .foreign_key(
                    ForeignKey::create()
                        .from_col(AgentEvents::TargetId)
                        .to(Targets::Table, Targets::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                );
        });
        rebuild(
            manager,
            table,
            "CREATE UNIQUE INDEX agent_events_idempotency ON agent_events (target_id, attempt, agent_instance, seq)",
        )
        .await
    }
}
