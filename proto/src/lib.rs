//! The words every fleetpatch component shares.
//!
//! * [`v1`]: the bus messages and the agent-report protocol, generated from
//!   `proto/fleetpatch/v1/*.proto` at build time (no system `protoc` needed).
//! * [`plan`]: the deployment plan a worker stages beside the agent.
//! * [`state`]: the target and patch state machines and the rollout states.
//! * [`routing`]: the names of the work queues the messages travel on.
//! * [`report_auth`]: agent tokens and the MAC every agent request carries.
//!
//! This crate holds data and pure functions only: no I/O, no clock.

pub mod plan;
pub mod relay;
pub mod report_auth;
pub mod routing;
pub mod state;

/// Generated protobuf types (`package fleetpatch.v1`).
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/fleetpatch.v1.rs"));
}

pub use prost::Message;

/// Hard upper bounds on what an agent may send; the collector rejects more.
pub mod limits {
    /// Largest request body the collector reads (bytes); more gets 413.
    pub const MAX_REPORT_BODY_BYTES: usize = 256 * 1024;
    /// Most reports in one batch.
    pub const MAX_REPORTS_PER_BATCH: usize = 500;
    /// Longest output tail stored per patch (bytes); longer tails are cut at the front.
    pub const MAX_OUTPUT_TAIL_BYTES: usize = 8 * 1024;
    /// Longest free-text message in a final result (bytes).
    pub const MAX_MESSAGE_BYTES: usize = 4 * 1024;
}
