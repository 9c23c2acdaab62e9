//! The outbox relay used to hold a `FOR UPDATE SKIP LOCKED` transaction open
//! while it published to the broker, so a broker that blocked (a memory
//! alarm, a network cut) pinned row locks and a pool connection in every
//! service. Now a relay *claims* rows for a while (a lease, in unix
//! milliseconds so SQLite and PostgreSQL compare it the same way), commits,
//! publishes with no transaction open, then deletes them; a relay that dies
//! in between leaves rows whose lease expires and are published again.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Outbox {
    Table,
    ClaimedUntilMs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Outbox::Table)
                    .add_column(ColumnDef::new(Outbox::ClaimedUntilMs).big_integer().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table(Outbox::Table).drop_column(Outbox::ClaimedUntilMs).to_owned()).await
    }
}
