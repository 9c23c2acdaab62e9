//! Offline targets (`retry_offline_for`): a target that could not be
//! reached after every try waits as `offline` until `offline_until`, and
//! its next reachability check is due at `next_check_at` (the reconciler
//! sends a lost one again). Both are NULL for a target that is not offline.
//!
//! SQLite adds one column per ALTER TABLE statement, hence one call each.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Targets {
    Table,
    OfflineUntil,
    NextCheckAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Targets::OfflineUntil, Targets::NextCheckAt] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Targets::Table)
                        .add_column(ColumnDef::new(column).timestamp_with_time_zone().null())
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Targets::NextCheckAt, Targets::OfflineUntil] {
            manager.alter_table(Table::alter().table(Targets::Table).drop_column(column).to_owned()).await?;
        }
        Ok(())
    }
}
