//! Idle SSH connections kept for the next step to the same target.
//!
//! A deployment job runs probe, stage and start one after the other, and
//! the cleanup follows seconds later when the agent is quick: without
//! reuse each step logs in again, and on a fleet the targets' `sshd` spends
//! most of its CPU on key exchanges and session set-up. A connection is
//! handed back after a step whose commands ran (even when a command
//! reported a failure) and kept for [`SshOptions::connection_reuse_seconds`];
//! a step whose SSH session failed (timeout, broken channel) closes it, and
//! one the server closed meanwhile is not reused. Before a kept connection
//! is handed out it must answer a keepalive (one round trip, 3 s at most):
//! a peer that went silent (rebooted, an idle flow dropped by a firewall)
//! costs a fresh login, never a failed step. The host key was checked
//! when the connection was opened; a reused one is not checked again.
//! Only connections logged in with the same user, port and
//! credential are reused (the key is a hash of the credential, never the
//! credential itself). This is a cache, not state: a worker that dies loses
//! nothing but the idle connections.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use fleetpatch_transport::{Credential, TargetSpec};
use tokio::sync::Mutex;

use crate::session::Connection;
use crate::SshOptions;

/// At most this many idle connections in all (a fleet rollout touches each
/// target for a few seconds; thousands of idle sessions would only pin
/// memory on both sides).
const MAX_IDLE: usize = 256;

/// How long a reused connection may take to answer its keepalive before a
/// fresh login replaces it (at most; `connect_timeout_seconds` if shorter).
const PING_SECONDS: u64 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    host: String,
    port: u16,
    user: String,
    credential: u64,
}

fn credential_hash(credential: &Option<Credential>) -> u64 {
    let mut hasher = DefaultHasher::new();
    match credential {
        None => 0u8.hash(&mut hasher),
        Some(Credential::Password { username, password }) => {
            (1u8, username, password.expose()).hash(&mut hasher);
        }
        Some(Credential::PrivateKey { username, key_pem, passphrase }) => {
            (2u8, username, key_pem.expose(), passphrase.as_ref().map(|p| p.expose())).hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// The idle connections of one transport.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<HashMap<Key, Vec<(Connection, Instant)>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    fn key(options: &SshOptions, target: &TargetSpec) -> Option<Key> {
        let (user, port) = crate::session::login_of(options, target).ok()?;
        Some(Key { host: target.host.clone(), port, user, credential: credential_hash(&target.credential) })
    }

    /// An idle connection to this target that still answers, or a new one.
    pub async fn connect(&self, options: &SshOptions, target: &TargetSpec) -> fleetpatch_transport::Result<Connection> {
        if let Some(connection) = self.take_idle(options, target).await {
            let within = Duration::from_secs(options.connect_timeout_seconds.clamp(1, PING_SECONDS));
            if connection.answers(within).await {
                tracing::trace!(address = %connection.address, "ssh connection reused");
                return Ok(connection);
            }
            tracing::debug!(address = %connection.address, "idle ssh connection no longer answers; logging in again");
            connection.close().await;
        }
        Connection::open(options, target).await
    }

    /// The newest idle connection kept for this target that is neither
    /// expired nor closed; those found expired or closed on the way are
    /// closed.
    async fn take_idle(&self, options: &SshOptions, target: &TargetSpec) -> Option<Connection> {
        let ttl = Duration::from_secs(options.connection_reuse_seconds);
        let key = Self::key(options, target).filter(|_| !ttl.is_zero())?;
        let mut expired = Vec::new();
        let found = {
            let mut idle = self.idle.lock().await;
            let list = idle.get_mut(&key)?;
            let mut found = None;
            while let Some((connection, since)) = list.pop() {
                if since.elapsed() < ttl && !connection.is_closed() {
                    found = Some(connection);
                    break;
                }
                expired.push(connection);
            }
            if list.is_empty() {
                idle.remove(&key);
            }
            found
        };
        for connection in expired {
            connection.close().await;
        }
        found
    }

    /// Hands a connection back after a step that went well; closes it when
    /// reuse is off, the pool is full, or it is no longer open.
    pub async fn release(&self, options: &SshOptions, target: &TargetSpec, connection: Connection) {
        let ttl = Duration::from_secs(options.connection_reuse_seconds);
        let key = Self::key(options, target);
        let (Some(key), false) = (key, ttl.is_zero() || connection.is_closed()) else {
            connection.close().await;
            return;
        };
        let mut stale = Vec::new();
        let refused = {
            let mut idle = self.idle.lock().await;
            // Drop what has expired everywhere, so targets that are done do
            // not keep their sessions until the pool fills up.
            for list in idle.values_mut() {
                let (keep, old): (Vec<_>, Vec<_>) = list.drain(..).partition(|(_, since)| since.elapsed() < ttl);
                *list = keep;
                stale.extend(old.into_iter().map(|(connection, _)| connection));
            }
            idle.retain(|_, list| !list.is_empty());
            let total: usize = idle.values().map(Vec::len).sum();
            if total >= MAX_IDLE {
                Some(connection)
            } else {
                idle.entry(key).or_default().push((connection, Instant::now()));
                None
            }
        };
        for connection in stale.into_iter().chain(refused) {
            connection.close().await;
        }
    }

    /// Idle connections now (for tests and metrics).
    pub async fn idle_count(&self) -> usize {
        self.idle.lock().await.values().map(Vec::len).sum()
    }
}
