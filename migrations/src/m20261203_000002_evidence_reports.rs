//! Evidence reports ("prove what happened"): the digest of every report the
//! API produced, so a copy handed to an auditor later can be checked
//! against what fleetpatch issued (`GET /v1/reports/{sha256}`).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum EvidenceReports {
    Table,
    Sha256,
    RolloutId,
    Format,
    Bytes,
    CreatedAt,
    CreatedBy,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(EvidenceReports::Table)
                    .col(ColumnDef::new(EvidenceReports::Sha256).string().not_null().primary_key())
                    .col(ColumnDef::new(EvidenceReports::RolloutId).uuid().not_null())
                    .col(ColumnDef::new(EvidenceReports::Format).string().not_null())
                    .col(ColumnDef::new(EvidenceReports::Bytes).big_integer().not_null())
                    .col(ColumnDef::new(EvidenceReports::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(EvidenceReports::CreatedBy).string().not_null())
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(EvidenceReports::Table).to_owned()).await
    }
}
