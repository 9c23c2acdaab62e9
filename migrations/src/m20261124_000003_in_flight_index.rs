//! Dispatch counts a rollout's targets in flight after every batch of final
//! results. Through `targets_dispatch` that count visited every version of
//! every target row that was ever queued, probing, staging, installing or
//! running since the last vacuum (a state change is never a HOT update), so
//! it grew with the rollout's history. This partial index holds only the
//! rows in those states; the dispatch query names the same states as
//! literals so that the planner can prove it may use it.
//!
//! The states are written out here on purpose: a migration describes the
//! schema as it was, and must not move when the code's constants do.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Targets {
    Table,
    RolloutId,
    Wave,
    State,
}

const IN_FLIGHT_INDEX: &str = "targets_in_flight";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(IN_FLIGHT_INDEX)
                    .table(Targets::Table)
                    .col(Targets::RolloutId)
                    .col(Targets::Wave)
                    .and_where(Expr::col(Targets::State).is_in([
                        "queued",
                        "probing",
                        "staging",
                        "installing",
                        "running",
                    ]))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_index(Index::drop().name(IN_FLIGHT_INDEX).table(Targets::Table).to_owned()).await
    }
}
