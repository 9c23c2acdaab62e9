//! Routing keys of the work exchange. Each key is also the name (after the
//! configured prefix) of the durable work queue its messages land in.

/// [`crate::v1::DeployJob`], consumed by workers.
pub const DEPLOY: &str = "deploy";
/// [`crate::v1::CleanupJob`], consumed by workers.
pub const CLEANUP: &str = "cleanup";
/// [`crate::v1::VerifyJob`], consumed by workers.
pub const VERIFY: &str = "verify";
/// [`crate::v1::ReachabilityCheck`], consumed by workers.
pub const REACH: &str = "reach";
/// [`crate::v1::WatchTimer`], consumed by the scheduler's watchdog.
pub const WATCH: &str = "watch";
/// [`crate::v1::DispatchRequest`], consumed by the scheduler's dispatcher.
pub const DISPATCH: &str = "dispatch";

/// Every work queue, in a stable order.
pub const WORK_QUEUES: [&str; 6] = [DEPLOY, CLEANUP, VERIFY, REACH, WATCH, DISPATCH];

/// Routing key of a [`crate::v1::TargetEvent`] on the events exchange.
pub fn target_event_key(to_state: &str) -> String {
    format!("target.{to_state}")
}
