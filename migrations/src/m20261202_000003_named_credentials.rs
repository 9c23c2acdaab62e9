//! Targets name a credential an administrator defined (`[credentials.<name>]`
//! where the workers run) instead of carrying a secret reference chosen by
//! the API caller: `targets.credential_ref` becomes `targets.credential`.
//!
//! The column is renamed, not replaced: a target of a rollout created before
//! this migration keeps the reference it had, which is no credential name,
//! so a worker fails it with "no credential is named \"file:…\"" (never
//! reading the reference) and the operator sees what to define.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Targets {
    Table,
    CredentialRef,
    Credential,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Targets::Table)
                    .rename_column(Targets::CredentialRef, Targets::Credential)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Targets::Table)
                    .rename_column(Targets::Credential, Targets::CredentialRef)
                    .to_owned(),
            )
            .await
    }
}
