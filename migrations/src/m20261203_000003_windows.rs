//! Schedules and maintenance windows. A target stores the index of the set
//! of windows its labels select (`window_group`, into the rollout's
//! `settings.schedule.groups`; NULL when the rollout has no windows), so
//! dispatch picks the targets whose windows are open in its query. A
//! rollout waiting for a window stores when the next one opens
//! (`next_window_at`), which the reconciler watches.
//!
//! SQLite adds one column per ALTER TABLE statement, hence one call each.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Targets {
    Table,
    WindowGroup,
}

#[derive(DeriveIden)]
enum Rollouts {
    Table,
    NextWindowAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Targets::Table)
                    .add_column(ColumnDef::new(Targets::WindowGroup).integer().null())
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Rollouts::Table)
                    .add_column(ColumnDef::new(Rollouts::NextWindowAt).timestamp_with_time_zone().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(Table::alter().table(Rollouts::Table).drop_column(Rollouts::NextWindowAt).to_owned())
            .await?;
        manager.alter_table(Table::alter().table(Targets::Table).drop_column(Targets::WindowGroup).to_owned()).await
    }
}
