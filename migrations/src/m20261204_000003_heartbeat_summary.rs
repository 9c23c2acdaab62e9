//! Heartbeats as one summary row per agent run instead of one event row
//! each (issue 20): `agent_heartbeats` holds, per (target, attempt, agent
//! instance), how many heartbeats moved the target's deadline, the highest
//! heartbeat seq (a resent heartbeat at or below it is a duplicate) and
//! when the first and the last arrived. A heartbeat only has to move the
//! deadline; `started`, `finished` and `final` stay one `agent_events` row
//! each, and `collector.heartbeat_events = "every"` keeps a row per
//! heartbeat as well.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AgentHeartbeats {
    Table,
    TargetId,
    Attempt,
    AgentInstance,
    Count,
    LastSeq,
    PatchIndex,
    FirstReceivedAt,
    LastReceivedAt,
}

#[derive(DeriveIden)]
enum Targets {
    Table,
    Id,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AgentHeartbeats::Table)
                    .col(ColumnDef::new(AgentHeartbeats::TargetId).uuid().not_null())
                    .col(ColumnDef::new(AgentHeartbeats::Attempt).integer().not_null())
                    .col(ColumnDef::new(AgentHeartbeats::AgentInstance).big_integer().not_null())
                    .col(ColumnDef::new(AgentHeartbeats::Count).big_integer().not_null())
                    .col(ColumnDef::new(AgentHeartbeats::LastSeq).big_integer().not_null())
                    .col(ColumnDef::new(AgentHeartbeats::PatchIndex).integer().null())
                    .col(ColumnDef::new(AgentHeartbeats::FirstReceivedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(AgentHeartbeats::LastReceivedAt).timestamp_with_time_zone().not_null())
                    .primary_key(
                        Index::create()
                            .col(AgentHeartbeats::TargetId)
                            .col(AgentHeartbeats::Attempt)
                            .col(AgentHeartbeats::AgentInstance),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(AgentHeartbeats::Table, AgentHeartbeats::TargetId)
                            .to(Targets::Table, Targets::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(AgentHeartbeats::Table).to_owned()).await
    }
}
