//! sea-orm entities, one module per table (see `migrations/`).
#![allow(missing_docs)]

pub mod rollouts {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "rollouts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub name: String,
        pub state: String,
        pub pause_reason: Option<String>,
        pub current_wave: i32,
        pub concurrency: i32,
        pub timeout_seconds: i32,
        pub waves: Json,
        pub settings: Json,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
        pub completed_at: Option<ChronoDateTimeUtc>,
        pub next_window_at: Option<ChronoDateTimeUtc>,
        /// Dispatch's cursor: no pending target of the rollout sorts before
        /// `(dispatch_wave, dispatch_ordinal)`.
        pub dispatch_wave: i32,
        pub dispatch_ordinal: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod patches {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "patches")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub rollout_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub patch_index: i32,
        pub name: String,
        pub kb: Option<String>,
        pub file: String,
        pub sha256: String,
        pub size: i64,
        pub installer: String,
        pub arguments: String,
        pub success_codes: Json,
        pub reboot_codes: Json,
        pub timeout_seconds: i32,
        pub detection: Option<Json>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod targets {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "targets")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub rollout_id: Uuid,
        pub ordinal: i32,
        /// Index into the rollout's `settings.schedule.groups`; NULL without windows.
        pub window_group: Option<i32>,
        pub host: String,
        pub port: Option<i32>,
        pub transport: String,
        pub labels: Json,
        pub credential: Option<String>,
        pub wave: i32,
        pub state: String,
        pub attempt: i32,
        pub r#try: i32,
        pub token_hash: Option<String>,
        pub token_nonce: Option<String>,
        pub timeout_seconds: i32,
        pub last_seen_at: Option<ChronoDateTimeUtc>,
        pub error: Option<String>,
        pub os: Option<String>,
        pub arch: Option<String>,
        pub probe: Option<Json>,
        pub queued_at: Option<ChronoDateTimeUtc>,
        pub running_at: Option<ChronoDateTimeUtc>,
        pub finished_at: Option<ChronoDateTimeUtc>,
        pub verified_state: Option<String>,
        pub verified_at: Option<ChronoDateTimeUtc>,
        /// While `offline`: when `retry_offline_for` runs out.
        pub offline_until: Option<ChronoDateTimeUtc>,
        /// While `offline` or `rebooting`: when the next reachability check is due.
        pub next_check_at: Option<ChronoDateTimeUtc>,
        /// While `rebooting`: when `reboot_timeout` runs out.
        pub reboot_until: Option<ChronoDateTimeUtc>,
        /// While `rebooting`: when a check first found the machine down.
        pub went_down_at: Option<ChronoDateTimeUtc>,
        /// How the installers reached the target (push, relay pull, push after a relay failure).
        pub delivery: Option<String>,
        pub created_at: ChronoDateTimeUtc,
        pub updated_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod target_patches {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "target_patches")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub target_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub patch_index: i32,
        pub rollout_id: Uuid,
        pub state: String,
        pub exit_code: Option<i32>,
        pub outcome: Option<String>,
        pub reboot_required: bool,
        pub output_tail: Option<String>,
        pub error: Option<String>,
        pub started_at: Option<ChronoDateTimeUtc>,
        pub finished_at: Option<ChronoDateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod agent_events {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "agent_events")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub target_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub attempt: i32,
        #[sea_orm(primary_key, auto_increment = false)]
        pub agent_instance: i64,
        #[sea_orm(primary_key, auto_increment = false)]
        pub seq: i64,
        pub kind: String,
        pub patch_index: Option<i32>,
        pub exit_code: Option<i32>,
        pub detail: Option<String>,
        pub sent_at: Option<ChronoDateTimeUtc>,
        pub received_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod agent_heartbeats {
    use sea_orm::entity::prelude::*;

    /// One row per agent run (target, attempt, agent instance): how many
    /// heartbeats moved the deadline, the highest heartbeat seq, and when
    /// the first and the last arrived.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "agent_heartbeats")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub target_id: Uuid,
        #[sea_orm(primary_key, auto_increment = false)]
        pub attempt: i32,
        #[sea_orm(primary_key, auto_increment = false)]
        pub agent_instance: i64,
        pub count: i64,
        pub last_seq: i64,
        pub patch_index: Option<i32>,
        pub first_received_at: ChronoDateTimeUtc,
        pub last_received_at: ChronoDateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod target_transitions {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "target_transitions")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub rollout_id: Uuid,
        pub target_id: Uuid,
        pub from_state: String,
        pub to_state: String,
        pub at: ChronoDateTimeUtc,
        pub detail: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod dispatch_rewinds {
    use sea_orm::entity::prelude::*;

    /// A target moved back to `pending` at `(wave, ordinal)`: the next
    /// dispatch moves its rollout's cursor back to it (if it is ahead) and
    /// deletes the row.
    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "dispatch_rewinds")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub rollout_id: Uuid,
        pub wave: i32,
        pub ordinal: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod outbox {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "outbox")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub exchange: String,
        pub routing_key: String,
        pub payload: Vec<u8>,
        pub headers: Json,
        pub created_at: ChronoDateTimeUtc,
        /// A relay's claim on the row (unix ms) while it publishes it.
        pub claimed_until_ms: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod api_keys {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "api_keys")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: Uuid,
        pub key_id: String,
        pub name: String,
        pub role: String,
        pub secret_hash: String,
        pub created_at: ChronoDateTimeUtc,
        pub expires_at: Option<ChronoDateTimeUtc>,
        pub revoked_at: Option<ChronoDateTimeUtc>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod audit_log {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "audit_log")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub at: ChronoDateTimeUtc,
        pub actor: String,
        pub actor_kind: String,
        pub role: String,
        pub method: String,
        pub route: String,
        pub rollout_id: Option<Uuid>,
        pub source: String,
        pub status: i32,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub mod evidence_reports {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "evidence_reports")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub sha256: String,
        pub rollout_id: Uuid,
        pub format: String,
        pub bytes: i64,
        pub created_at: ChronoDateTimeUtc,
        pub created_by: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
