//! Every `started` and `finished` report updates its patch's row in
//! `target_patches`, and every heartbeat its run's row in
//! `agent_heartbeats`. On PostgreSQL none of those updates was heap-only
//! (HOT): `target_patches_by_patch (rollout_id, patch_index, state)` held
//! the `state` each report changes, so each update wrote a new entry into
//! both of the table's indexes, and neither table left free space in its
//! pages (`pg_stat_user_tables` over one collector phase of `fleetpatch
//! bench`: 0 HOT updates of 33,830 on `target_patches`).
//!
//! The only read of `target_patches` by rollout is the evidence report's
//! (every patch row of a rollout, by target then patch), so the index is
//! now `target_patches_by_rollout (rollout_id, target_id, patch_index)`:
//! columns no update changes, in the report's order. On PostgreSQL both
//! tables keep free space in each page (`fillfactor`), like `targets`
//! (migration 2), so the updates stay in their page.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum TargetPatches {
    Table,
    RolloutId,
    TargetId,
    PatchIndex,
    State,
}

/// The tables whose rows the collector updates in place, and the free
/// space (percent of each page kept empty) left for those updates.
const FILLFACTORS: [(&str, u8); 2] = [("target_patches", 70), ("agent_heartbeats", 70)];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(Index::drop().name("target_patches_by_patch").table(TargetPatches::Table).to_owned())
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("target_patches_by_rollout")
                    .table(TargetPatches::Table)
                    .col(TargetPatches::RolloutId)
                    .col(TargetPatches::TargetId)
                    .col(TargetPatches::PatchIndex)
                    .to_owned(),
            )
            .await?;
        if manager.get_database_backend() == DbBackend::Postgres {
            for (table, fillfactor) in FILLFACTORS {
                // A storage parameter, PostgreSQL's only; pages written from now on keep the room.
                manager
                    .get_connection()
                    .execute_unprepared(&format!("ALTER TABLE {table} SET (fillfactor = {fillfactor})"))
                    .await?;
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            for (table, _) in FILLFACTORS {
                manager.get_connection().execute_unprepared(&format!("ALTER TABLE {table} RESET (fillfactor)")).await?;
            }
        }
        manager
            .drop_index(Index::drop().name("target_patches_by_rollout").table(TargetPatches::Table).to_owned())
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("target_patches_by_patch")
                    .table(TargetPatches::Table)
                    .col(TargetPatches::RolloutId)
                    .col(TargetPatches::PatchIndex)
                    .col(TargetPatches::State)
                    .to_owned(),
            )
            .await
    }
}
