//! API keys and the audit log.
//!
//! * `api_keys`: one row per key an administrator created. Only the SHA-256
//!   of the key is stored (`secret_hash`); `key_id` is the public part of
//!   the key (`fpk_<key_id>_<secret>`) and the unique lookup column, so a
//!   request costs one indexed read. `name` is unique: keys are revoked by
//!   name.
//! * `audit_log`: every mutating API call by an authenticated identity
//!   (and every refusal by role). Append-only: triggers on both backends
//!   refuse UPDATE and DELETE, so not even a bug in the store can rewrite
//!   history. `rollout_id` is no foreign key: an entry outlives its rollout,
//!   and a refused call may name a rollout that never existed.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    KeyId,
    Name,
    Role,
    SecretHash,
    CreatedAt,
    ExpiresAt,
    RevokedAt,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    At,
    Actor,
    ActorKind,
    Role,
    Method,
    Route,
    RolloutId,
    Source,
    Status,
}

const POSTGRES_APPEND_ONLY: &str = r#"
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP;
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
"#;

const SQLITE_APPEND_ONLY: [&str; 2] = [
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log \
     BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: UPDATE refused'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log \
     BEGIN SELECT RAISE(ABORT, 'audit_log is append-only: DELETE refused'); END",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ApiKeys::Table)
                    .col(ColumnDef::new(ApiKeys::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(ApiKeys::KeyId).string().not_null().unique_key())
                    .col(ColumnDef::new(ApiKeys::Name).string().not_null().unique_key())
                    .col(ColumnDef::new(ApiKeys::Role).string().not_null())
                    .col(ColumnDef::new(ApiKeys::SecretHash).string().not_null())
                    .col(ColumnDef::new(ApiKeys::CreatedAt).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(ApiKeys::ExpiresAt).timestamp_with_time_zone().null())
                    .col(ColumnDef::new(ApiKeys::RevokedAt).timestamp_with_time_zone().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditLog::Table)
                    .col(ColumnDef::new(AuditLog::Id).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(AuditLog::At).timestamp_with_time_zone().not_null())
                    .col(ColumnDef::new(AuditLog::Actor).string().not_null())
                    .col(ColumnDef::new(AuditLog::ActorKind).string().not_null())
                    .col(ColumnDef::new(AuditLog::Role).string().not_null())
                    .col(ColumnDef::new(AuditLog::Method).string().not_null())
                    .col(ColumnDef::new(AuditLog::Route).string().not_null())
                    .col(ColumnDef::new(AuditLog::RolloutId).uuid().null())
                    .col(ColumnDef::new(AuditLog::Source).string().not_null())
                    .col(ColumnDef::new(AuditLog::Status).integer().not_null())
                    .to_owned(),
            )
            .await?;
        // "What happened to this rollout", newest first.
        manager
            .create_index(
                Index::create()
                    .name("audit_log_rollout")
                    .table(AuditLog::Table)
                    .col(AuditLog::RolloutId)
                    .col(AuditLog::Id)
                    .to_owned(),
            )
            .await?;
        let connection = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                connection.execute_unprepared(POSTGRES_APPEND_ONLY).await?;
            }
            DbBackend::Sqlite => {
                for statement in SQLITE_APPEND_ONLY {
                    connection.execute_unprepared(statement).await?;
                }
            }
            DbBackend::MySql => {}
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.drop_table(Table::drop().table(AuditLog::Table).to_owned()).await?;
        if manager.get_database_backend() == DbBackend::Postgres {
            manager.get_connection().execute_unprepared("DROP FUNCTION IF EXISTS audit_log_append_only()").await?;
        }
        manager.drop_table(Table::drop().table(ApiKeys::Table).to_owned()).await
    }
}
