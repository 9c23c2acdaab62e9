//! How a target's installers reached it (`targets.delivery`): pushed over
//! its transport, pulled by its agent from a relay, or pushed because its
//! relay did not answer (with the reason). NULL until the worker stages the
//! deployment.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Targets {
    Table,
    Delivery,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Targets::Table)
                    .add_column(ColumnDef::new(Targets::Delivery).text().null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.alter_table(Table::alter().table(Targets::Table).drop_column(Targets::Delivery).to_owned()).await
    }
}
