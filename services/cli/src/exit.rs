//! The exit-code vocabulary of the `fleetpatch` client commands: the
//! statuses scripts can rely on, and [`Failure`], a message with its status.
//!
//! A leaf module: it imports nothing of this crate, so every command
//! (`commands`, `check`, `main`) can use it without tying them to each
//! other. The conversions from the errors of other modules
//! (`From<ClientError>`, `From<InputError>`) live next to those errors'
//! users, in `commands`.

/// Done; for `rollout watch` (and `create --watch`): every target succeeded.
pub const OK: u8 = 0;
/// An unexpected error (a bug, or an API answer this client does not understand).
pub const ERROR: u8 = 1;
/// Wrong command-line usage (clap's own status; also an unusable `--api` URL).
pub const USAGE: u8 = 2;
/// Invalid input: the rollout file, a CSV file or an inventory is wrong,
/// or the API refused the request (4xx: a wrong field, an unknown id, a conflict).
pub const INVALID: u8 = 3;
/// The API could not be reached, or answered 5xx.
pub const UNREACHABLE: u8 = 4;
/// `watch`: the rollout completed, but not every target succeeded.
pub const TARGETS_FAILED: u8 = 5;
/// `watch`: the rollout is paused (a wave's failure threshold, or an operator).
pub const PAUSED: u8 = 6;
/// `watch`: the rollout was aborted.
pub const ABORTED: u8 = 7;
/// `watch`: the rollout waits for an operator's approval of its next wave
/// (`rollout approve`); a wave that promotes automatically is watched on.
pub const AWAITING_APPROVAL: u8 = 11;
/// `check` (and `rollout create --preflight`): a preflight check failed
/// on at least one target; `create --preflight` then created nothing.
pub const CHECK_FAILED: u8 = 8;
/// The API refused the credential (401): none was sent, or it is
/// unknown, expired or revoked.
pub const UNAUTHENTICATED: u8 = 9;
/// The API refused the request for the credential's role (403).
pub const FORBIDDEN: u8 = 10;

/// A failure as the user sees it: a message and an exit status.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}
