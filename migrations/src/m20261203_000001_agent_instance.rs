//! Reports carry the agent process that produced them (`agent_instance`, a
//! random number each agent process draws). The collector's idempotency key
//! becomes (target, attempt, agent instance, seq): a resent report keeps its
//! instance and is still a duplicate, while a second agent run of the same
//! deployment, which numbers its reports from 1 again, is stored as such
//! instead of being dropped as a duplicate of the first run.
//!
//! Rows written before this migration get instance 0, the instance an agent
//! older than the field sends.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AgentEvents {
    Table,
    AgentInstance,
}

/// Replaces the idempotency index with one on `columns`, in one call: on
/// SQLite, a pool's other connection may still hold the schema from before
/// the drop and refuse the create by name, so both go over one connection.
async fn rebuild_idempotency(manager: &SchemaManager<'_>, columns: &str) -> Result<(), DbErr> {
    manager
        .get_connection()
        .execute_unprepared(&format!(
            "DROP INDEX IF EXISTS agent_events_idempotency; \
             CREATE UNIQUE INDEX agent_events_idempotency ON agent_events ({columns})"
        ))
        .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(AgentEvents::Table)
                    .add_column(ColumnDef::new(AgentEvents::AgentInstance).big_integer().not_null().default(0))
                    .to_owned(),
            )
            .await?;
        rebuild_idempotency(manager, "target_id, attempt, agent_instance, seq").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Going back keeps one run's report per (target, attempt, seq): the
        // old key cannot hold two runs.
        manager
            .get_connection()
            .execute_unprepared(
                "DELETE FROM agent_events WHERE id NOT IN \
                 (SELECT MIN(id) FROM agent_events GROUP BY target_id, attempt, seq)",
            )
            .await?;
        rebuild_idempotency(manager, "target_id, attempt, seq").await?;
        manager
            .alter_table(Table::alter().table(AgentEvents::Table).drop_column(AgentEvents::AgentInstance).to_owned())
            .await
    }
}
