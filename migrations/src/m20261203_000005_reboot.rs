//! Reboot and verify: a target whose agent succeeded and whose rollout's
//! reboot policy asks for a reboot waits as `rebooting` until the machine
//! is back (`reboot_until` is when `reboot_timeout` runs out; `went_down_at`
//! when a check first found it down). Its checks reuse `next_check_at`.
//! Both are NULL for a target that is not rebooting.
//!
//! `rebooting` holds a concurrency slot, so the partial index of in-flight
//! targets is replaced by one that has it (`targets_in_flight_v2`: the
//! dispatch query names the in-flight states as literals, and the planner
//! uses a partial index only when they are the index's).
//!
//! SQLite adds one column per ALTER TABLE statement, hence one call each.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Targets {
    Table,
    RolloutId,
    Wave,
    State,
    RebootUntil,
    WentDownAt,
}

const OLD_INDEX: &str = "targets_in_flight";
const NEW_INDEX: &str = "targets_in_flight_v2";

fn in_flight_index(name: &str, states: &[&str]) -> IndexCreateStatement {
    Index::create()
        .name(name)
        .table(Targets::Table)
        .col(Targets::RolloutId)
        .col(Targets::Wave)
        .and_where(Expr::col(Targets::State).is_in(states.iter().copied()))
        .to_owned()
}

/// `DROP INDEX` as both databases write it (sea-query's form names the
/// table, which SQLite's does not take).
async fn drop_index(manager: &SchemaManager<'_>, name: &str) -> Result<(), DbErr> {
    manager.get_connection().execute_unprepared(&format!("DROP INDEX IF EXISTS {name}")).await.map(|_| ())
}

const BEFORE: [&str; 5] = ["queued", "probing", "staging", "installing", "running"];
const AFTER: [&str; 6] = ["queued", "probing", "staging", "installing", "running", "rebooting"];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for column in [Targets::RebootUntil, Targets::WentDownAt] {
            manager
                .alter_table(
                    Table::alter()
                        .table(Targets::Table)
                        .add_column(ColumnDef::new(column).timestamp_with_time_zone().null())
                        .to_owned(),
                )
                .await?;
        }
        manager.create_index(in_flight_index(NEW_INDEX, &AFTER)).await?;
        drop_index(manager, OLD_INDEX).await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.create_index(in_flight_index(OLD_INDEX, &BEFORE)).await?;
        drop_index(manager, NEW_INDEX).await?;
        for column in [Targets::WentDownAt, Targets::RebootUntil] {
            manager.alter_table(Table::alter().table(Targets::Table).drop_column(column).to_owned()).await?;
        }
        Ok(())
    }
}
