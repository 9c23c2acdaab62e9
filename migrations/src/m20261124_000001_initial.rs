//! Rollouts, patches, targets, per-target patches, agent events, the state
//! transition history and the transactional outbox.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Rollouts {
    Table,
    Id,
    Name,
    State,
    PauseReason,
    CurrentWave,
    Concurrency,
    TimeoutSeconds,
    Waves,
    Settings,
    CreatedAt,
    UpdatedAt,
    CompletedAt,
}

#[derive(DeriveIden)]
enum Patches {
    Table,
    RolloutId,
    PatchIndex,
    Name,
    Kb,
    File,
    Sha256,
    Size,
    Installer,
    Arguments,
    SuccessCodes,
    RebootCodes,
    TimeoutSeconds,
    Detection,
}

#[derive(DeriveIden)]
enum Targets {
    Table,
    Id,
    RolloutId,
    Ordinal,
    Host,
    Port,
    Transport,
    Labels,
    CredentialRef,
    Wave,
    State,
    Attempt,
    Try,
    TokenHash,
    TokenNonce,
    TimeoutSeconds,
    LastSeenAt,
    Error,
    Os,
    Arch,
    Probe,
    QueuedAt,
    RunningAt,
    FinishedAt,
    VerifiedState,
    VerifiedAt,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum TargetPatches {
    Table,
    TargetId,
    PatchIndex,
    RolloutId,
    State,
    ExitCode,
    Outcome,
    RebootRequired,
    OutputTail,
    Error,
    StartedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum AgentEvents {
    Table,
    Id,
    TargetId,
    Attempt,
    Seq,
    Kind,
    PatchIndex,
    ExitCode,
    Detail,
    SentAt,
    ReceivedAt,
}

#[derive(DeriveIden)]
enum TargetTransitions {
    Table,
    Id,
    RolloutId,
    TargetId,
    FromState,
    ToState,
    At,
    Detail,
}

#[derive(DeriveIden)]
enum Outbox {
    Table,
    Id,
    Exchange,
    RoutingKey,
    Payload,
    Headers,
    CreatedAt,
}

fn ts(column: impl IntoIden) -> ColumnDef {
    ColumnDef::new(column).timestamp_with_time_zone().not_null().to_owned()
}

fn ts_null(column: impl IntoIden) -> ColumnDef {
    ColumnDef::new(column).timestamp_with_time_zone().null().to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Rollouts::Table)
                    .col(ColumnDef::new(Rollouts::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Rollouts::Name).string().not_null())
                    .col(ColumnDef::new(Rollouts::State).string().not_null())
                    .col(ColumnDef::new(Rollouts::PauseReason).text().null())
                    .col(ColumnDef::new(Rollouts::CurrentWave).integer().not_null())
                    .col(ColumnDef::new(Rollouts::Concurrency).integer().not_null())
                    .col(ColumnDef::new(Rollouts::TimeoutSeconds).integer().not_null())
                    .col(ColumnDef::new(Rollouts::Waves).json().not_null())
                    .col(ColumnDef::new(Rollouts::Settings).json().not_null())
                    .col(ts(Rollouts::CreatedAt))
                    .col(ts(Rollouts::UpdatedAt))
                    .col(ts_null(Rollouts::CompletedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Patches::Table)
                    .col(ColumnDef::new(Patches::RolloutId).uuid().not_null())
                    .col(ColumnDef::new(Patches::PatchIndex).integer().not_null())
                    .col(ColumnDef::new(Patches::Name).string().not_null())
                    .col(ColumnDef::new(Patches::Kb).string().null())
                    .col(ColumnDef::new(Patches::File).string().not_null())
                    .col(ColumnDef::new(Patches::Sha256).string().not_null())
                    .col(ColumnDef::new(Patches::Size).big_integer().not_null())
                    .col(ColumnDef::new(Patches::Installer).string().not_null())
                    .col(ColumnDef::new(Patches::Arguments).text().not_null())
                    .col(ColumnDef::new(Patches::SuccessCodes).json().not_null())
                    .col(ColumnDef::new(Patches::RebootCodes).json().not_null())
                    .col(ColumnDef::new(Patches::TimeoutSeconds).integer().not_null())
                    .col(ColumnDef::new(Patches::Detection).json().null())
                    .primary_key(Index::create().col(Patches::RolloutId).col(Patches::PatchIndex))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Patches::Table, Patches::RolloutId)
                            .to(Rollouts::Table, Rollouts::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Targets::Table)
                    .col(ColumnDef::new(Targets::Id).uuid().not_null().primary_key())
                    .col(ColumnDef::new(Targets::RolloutId).uuid().not_null())
                    .col(ColumnDef::new(Targets::Ordinal).integer().not_null())
                    .col(ColumnDef::new(Targets::Host).string().not_null())
                    .col(ColumnDef::new(Targets::Port).integer().null())
                    .col(ColumnDef::new(Targets::Transport).string().not_null())
                    .col(ColumnDef::new(Targets::Labels).json().not_null())
                    .col(ColumnDef::new(Targets::CredentialRef).string().null())
                    .col(ColumnDef::new(Targets::Wave).integer().not_null())
                    .col(ColumnDef::new(Targets::State).string().not_null())
                    .col(ColumnDef::new(Targets::Attempt).integer().not_null())
                    .col(ColumnDef::new(Targets::Try).integer().not_null())
                    .col(ColumnDef::new(Targets::TokenHash).string().null())
                    .col(ColumnDef::new(Targets::TokenNonce).string().null())
                    .col(ColumnDef::new(Targets::TimeoutSeconds).integer().not_null())
                    .col(ts_null(Targets::LastSeenAt))
                    .col(ColumnDef::new(Targets::Error).text().null())
                    .col(ColumnDef::new(Targets::Os).string().null())
                    .col(ColumnDef::new(Targets::Arch).string().null())
                    .col(ColumnDef::new(Targets::Probe).json().null())
                    .col(ts_null(Targets::QueuedAt))
                    .col(ts_null(Targets::RunningAt))
                    .col(ts_null(Targets::FinishedAt))
                    .col(ColumnDef::new(Targets::VerifiedState).string().null())
                    .col(ts_null(Targets::VerifiedAt))
                    .col(ts(Targets::CreatedAt))
                    .col(ts(Targets::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Targets::Table, Targets::RolloutId)
                            .to(Rollouts::Table, Rollouts::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("targets_dispatch")
                    .table(Targets::Table)
                    .col(Targets::RolloutId)
                    .col(Targets::State)
                    .col(Targets::Wave)
                    .col(Targets::Ordinal)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("targets_watchdog")
                    .table(Targets::Table)
                    .col(Targets::State)
                    .col(Targets::LastSeenAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(TargetPatches::Table)
                    .col(ColumnDef::new(TargetPatches::TargetId).uuid().not_null())
                    .col(ColumnDef::new(TargetPatches::PatchIndex).integer().not_null())
                    .col(ColumnDef::new(TargetPatches::RolloutId).uuid().not_null())
                    .col(ColumnDef::new(TargetPatches::State).string().not_null())
                    .col(ColumnDef::new(TargetPatches::ExitCode).integer().null())
                    .col(ColumnDef::new(TargetPatches::Outcome).string().null())
                    .col(ColumnDef::new(TargetPatches::RebootRequired).boolean().not_null())
                    .col(ColumnDef::new(TargetPatches::OutputTail).text().null())
                    .col(ColumnDef::new(TargetPatches::Error).text().null())
                    .col(ts_null(TargetPatches::StartedAt))
                    .col(ts_null(TargetPatches::FinishedAt))
                    .primary_key(Index::create().col(TargetPatches::TargetId).col(TargetPatches::PatchIndex))
                    .foreign_key(
                        ForeignKey::create()
                            .from(TargetPatches::Table, TargetPatches::TargetId)
                            .to(Targets::Table, Targets::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
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
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(AgentEvents::Table)
                    .col(ColumnDef::new(AgentEvents::Id).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(AgentEvents::TargetId).uuid().not_null())
                    .col(ColumnDef::new(AgentEvents::Attempt).integer().not_null())
                    .col(ColumnDef::new(AgentEvents::Seq).big_integer().not_null())
                    .col(ColumnDef::new(AgentEvents::Kind).string().not_null())
                    .col(ColumnDef::new(AgentEvents::PatchIndex).integer().null())
                    .col(ColumnDef::new(AgentEvents::ExitCode).integer().null())
                    .col(ColumnDef::new(AgentEvents::Detail).text().null())
                    .col(ts_null(AgentEvents::SentAt))
                    .col(ts(AgentEvents::ReceivedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(AgentEvents::Table, AgentEvents::TargetId)
                            .to(Targets::Table, Targets::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("agent_events_idempotency")
                    .table(AgentEvents::Table)
                    .col(AgentEvents::TargetId)
                    .col(AgentEvents::Attempt)
                    .col(AgentEvents::Seq)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(TargetTransitions::Table)
                    .col(ColumnDef::new(TargetTransitions::Id).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(TargetTransitions::RolloutId).uuid().not_null())
                    .col(ColumnDef::new(TargetTransitions::TargetId).uuid().not_null())
                    .col(ColumnDef::new(TargetTransitions::FromState).string().not_null())
                    .col(ColumnDef::new(TargetTransitions::ToState).string().not_null())
                    .col(ts(TargetTransitions::At))
                    .col(ColumnDef::new(TargetTransitions::Detail).text().null())
                    .foreign_key(
                        ForeignKey::create()
                            .from(TargetTransitions::Table, TargetTransitions::TargetId)
                            .to(Targets::Table, Targets::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("target_transitions_by_target")
                    .table(TargetTransitions::Table)
                    .col(TargetTransitions::TargetId)
                    .col(TargetTransitions::Id)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("target_transitions_by_rollout")
                    .table(TargetTransitions::Table)
                    .col(TargetTransitions::RolloutId)
                    .col(TargetTransitions::Id)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Outbox::Table)
                    .col(ColumnDef::new(Outbox::Id).big_integer().not_null().auto_increment().primary_key())
                    .col(ColumnDef::new(Outbox::Exchange).string().not_null())
                    .col(ColumnDef::new(Outbox::RoutingKey).string().not_null())
                    .col(ColumnDef::new(Outbox::Payload).binary().not_null())
                    .col(ColumnDef::new(Outbox::Headers).json().not_null())
                    .col(ts(Outbox::CreatedAt))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Outbox::Table.into_iden(),
            TargetTransitions::Table.into_iden(),
            AgentEvents::Table.into_iden(),
            TargetPatches::Table.into_iden(),
            Targets::Table.into_iden(),
            Patches::Table.into_iden(),
            Rollouts::Table.into_iden(),
        ] {
            manager.drop_table(Table::drop().table(table).if_exists().to_owned()).await?;
        }
        Ok(())
    }
}
