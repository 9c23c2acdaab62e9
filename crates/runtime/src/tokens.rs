//! The token key (`[tokens]`): the one secret agent tokens are derived
//! from. Workers derive each target's token from it and stage the token in
//! the plan; collectors derive the same token again to verify the agent's
//! signed requests (`fleetpatch_proto::report_auth`). Every worker and
//! every collector of an installation must hold the same key.
//!
//! A separate worker or collector process without a key refuses to start;
//! `fleetpatch all` and `fleetpatch demo` run both in one process and make
//! a random key for it ([`TokenKey::random`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Shortest key accepted (bytes): a 128-bit secret.
pub const MIN_KEY_BYTES: usize = 16;

/// Token settings (`[tokens]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenOptions {
    /// Secret reference (`env:NAME`, `file:/path`) of the token key, shared
    /// by every worker and collector. Empty: only `fleetpatch all` and
    /// `fleetpatch demo` start (with a random key of their own).
    pub key_ref: String,
}

/// The resolved token key; its bytes never appear in `Debug` output.
#[derive(Clone)]
pub struct TokenKey(Arc<Vec<u8>>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(…)")
    }
}

impl TokenKey {
    /// A random 32-byte key, for a process that runs workers and collectors
    /// together and shares it with nobody else.
    pub fn random() -> Self {
        let mut key = vec![0u8; 32];
        rand::Rng::fill(&mut rand::rng(), key.as_mut_slice());
        Self(Arc::new(key))
    }

    /// Reads the key `options.key_ref` names. `service` ("worker",
    /// "collector") goes into the error when no key is configured.
    pub fn resolve(options: &TokenOptions, service: &str) -> crate::Result<Self> {
        if options.key_ref.is_empty() {
            return Err(crate::Error::Config(format!(
                "tokens.key_ref is not set: a {service} needs the token key that every worker and collector of \
                 the installation shares; set tokens.key_ref (or FLEETPATCH__TOKENS__KEY_REF) to env:NAME or \
                 file:/path holding at least {MIN_KEY_BYTES} random bytes (e.g. `openssl rand -hex 32`)"
            )));
        }
        let key = crate::secrets::resolve(&options.key_ref)
            .map_err(|e| crate::Error::Config(format!("tokens.key_ref: {e}")))?;
        Self::from_bytes(key.into_bytes())
    }

    /// A key from its bytes (at least [`MIN_KEY_BYTES`]).
    pub fn from_bytes(key: Vec<u8>) -> crate::Result<Self> {
        if key.len() < MIN_KEY_BYTES {
            return Err(crate::Error::Config(format!(
                "tokens.key_ref: the token key has {} bytes; use at least {MIN_KEY_BYTES} random bytes \
                 (e.g. `openssl rand -hex 32`)",
                key.len()
            )));
        }
        Ok(Self(Arc::new(key)))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_key_names_the_setting_and_the_service() {
        let error = TokenKey::resolve(&TokenOptions::default(), "collector").unwrap_err().to_string();
        assert!(error.contains("tokens.key_ref") && error.contains("collector"), "{error}");
    }

    #[test]
    fn short_keys_are_refused_and_keys_are_never_printed() {
        std::env::set_var("FP_TEST_TOKEN_KEY_SHORT", "short");
        let options = TokenOptions { key_ref: "env:FP_TEST_TOKEN_KEY_SHORT".into() };
        let error = TokenKey::resolve(&options, "worker").unwrap_err().to_string();
        assert!(error.contains("at least 16") && !error.contains("short\""), "{error}");
        std::env::set_var("FP_TEST_TOKEN_KEY_LONG", "0123456789abcdef0123");
        let key = TokenKey::resolve(&TokenOptions { key_ref: "env:FP_TEST_TOKEN_KEY_LONG".into() }, "worker").unwrap();
        assert_eq!(key.as_bytes(), b"0123456789abcdef0123");
        assert_eq!(format!("{key:?}"), "TokenKey(…)");
        assert_ne!(TokenKey::random().as_bytes(), TokenKey::random().as_bytes());
    }
}
