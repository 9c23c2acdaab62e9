//! The database schema of fleetpatch, as sea-orm migrations.
//!
//! The same migrations run on PostgreSQL (production) and SQLite (the
//! embedded default of `fleetpatch demo`), so they use only the portable
//! schema builder: no backend-specific types, and raw SQL only for one
//! PostgreSQL storage parameter (`fillfactor` of `targets`, migration 2, and
//! of `target_patches` and `agent_heartbeats`, migration 15).
//!
//! Hot paths and their indexes:
//! * dispatch of the next pending target: `targets (rollout_id, state, wave, ordinal)`,
//!   scanned from the rollout's cursor (`rollouts.dispatch_wave`, `dispatch_ordinal`;
//!   migration 13), so the entries of targets already dispatched are not walked again;
//! * dispatch's count of the targets in flight: the partial index
//!   `targets (rollout_id, wave) WHERE state IN (…in flight…)` (migration 3),
//!   which holds only the rows in those states;
//! * the watchdog reconciler: `targets (state)` (`last_seen_at` is in no
//!   index, so the collector's updates of it are HOT updates on PostgreSQL);
//! * the collector's idempotent insert: `agent_events (target_id, attempt,
//!   agent_instance, seq)` (migration 7: a second agent run is kept, not deduplicated),
//!   the table's primary key since migration 16 (no surrogate id, no foreign key);
//! * a rollout's patch rows for its evidence report: `target_patches (rollout_id,
//!   target_id, patch_index)` (migration 15: no column a report updates is in an
//!   index of `target_patches` or `agent_heartbeats`, so on PostgreSQL the
//!   collector's updates of patches and heartbeat summaries are HOT updates, like
//!   those of `targets.last_seen_at`);
//! * an API request's key: unique `api_keys (key_id)`; a rollout's audit trail:
//!   `audit_log (rollout_id, id)` (migration 4, which also makes `audit_log` append-only).

pub use sea_orm_migration::prelude::*;

mod m20261124_000001_initial;
mod m20261124_000002_hot_last_seen;
mod m20261124_000003_in_flight_index;
mod m20261202_000001_api_keys_audit;
mod m20261202_000003_named_credentials;
mod m20261202_000004_outbox_lease;
mod m20261203_000001_agent_instance;
mod m20261203_000002_evidence_reports;
mod m20261203_000003_windows;
mod m20261203_000004_offline;
mod m20261203_000005_reboot;
mod m20261204_000001_delivery;
mod m20261204_000002_dispatch_cursor;
mod m20261204_000003_heartbeat_summary;
mod m20261205_000001_hot_patch_results;
mod m20261205_000002_event_key;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261124_000001_initial::Migration),
            Box::new(m20261124_000002_hot_last_seen::Migration),
            Box::new(m20261124_000003_in_flight_index::Migration),
            Box::new(m20261202_000001_api_keys_audit::Migration),
            Box::new(m20261202_000003_named_credentials::Migration),
            Box::new(m20261202_000004_outbox_lease::Migration),
            Box::new(m20261203_000001_agent_instance::Migration),
            Box::new(m20261203_000002_evidence_reports::Migration),
            Box::new(m20261203_000003_windows::Migration),
            Box::new(m20261203_000004_offline::Migration),
            Box::new(m20261203_000005_reboot::Migration),
            Box::new(m20261204_000001_delivery::Migration),
            Box::new(m20261204_000002_dispatch_cursor::Migration),
            Box::new(m20261204_000003_heartbeat_summary::Migration),
            Box::new(m20261205_000001_hot_patch_results::Migration),
            Box::new(m20261205_000002_event_key::Migration),
        ]
    }
}
