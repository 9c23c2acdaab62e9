//! Every report the collector accepts moves its target's `last_seen_at`.
//! With `last_seen_at` in an index, each of those updates wrote a new entry
//! into every index of `targets`. The watchdog reconciler needs only the
//! running targets (at most the rollouts' concurrency), so an index on
//! `state` serves it, and on PostgreSQL the updates of `last_seen_at` become
//! heap-only (HOT) updates, helped by free space left in each page.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Targets {
    Table,
    State,
    LastSeenAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_index(Index::drop().name("targets_watchdog").table(Targets::Table).to_owned()).await?;
        manager
            .create_index(Index::create().name("targets_state").table(Targets::Table).col(Targets::State).to_owned())
            .await?;
        if manager.get_database_backend() == DbBackend::Postgres {
            // A storage parameter, PostgreSQL's only: room in each page for HOT updates.
            manager.get_connection().execute_unprepared("ALTER TABLE targets SET (fillfactor = 70)").await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager.get_connection().execute_unprepared("ALTER TABLE targets RESET (fillfactor)").await?;
        }
        manager.drop_index(Index::drop().name("targets_state").table(Targets::Table).to_owned()).await?;
        manager
            .create_index(
                Index::create()
                    .name("targets_watchdog")
                    .table(Targets::Table)
                    .col(Targets::State)
                    .col(Targets::LastSeenAt)
                    .to_owned(),
            )
            .await
    }
}
