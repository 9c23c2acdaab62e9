//! Who may use the API, and what they did: API keys and the audit log.
//!
//! An API key looks like `fpk_<key id>_<secret>` (GitHub's and Grafana's
//! shape): a recognisable prefix so secret scanners and people can tell it
//! apart, a public key id (16 hex digits) that makes the lookup one indexed
//! read, and 32 random bytes from the operating system's RNG. The key is
//! shown once, when it is made ([`IssuedApiKey`]); the database holds only
//! its SHA-256 (a high-entropy secret needs no slow hash), compared in
//! constant time. A key has a unique name, a [`Role`], an optional expiry,
//! and can be revoked by name.
//!
//! [`ParsedApiKey::parse`] refuses a malformed bearer value before anything
//! else runs, and [`Store::check_api_key`] takes only a parsed key: garbage
//! costs no database work.
//!
//! The audit log is append-only (the migration's triggers refuse UPDATE and
//! DELETE on both databases); this module only appends and reads.

use std::fmt;

use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::entity::{api_keys, audit_log};
use crate::{Error, Result, Store};

/// The prefix of every fleetpatch API key.
pub const API_KEY_PREFIX: &str = "fpk_";
/// Hex digits of the public key id.
const KEY_ID_HEX: usize = 16;
/// Hex digits of the secret (32 random bytes).
const SECRET_HEX: usize = 64;
/// Length of a whole key: `fpk_` + id + `_` + secret.
pub const API_KEY_LEN: usize = API_KEY_PREFIX.len() + KEY_ID_HEX + 1 + SECRET_HEX;
/// Longest key name.
pub const MAX_KEY_NAME: usize = 64;

/// What an identity may do. Ordered: a higher role may do all a lower one may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads rollouts, targets and content.
    Viewer,
    /// Also creates, pauses, resumes, aborts and retries rollouts, and uploads content.
    Operator,
    /// Also reads the audit log (and administers keys and credentials).
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is none of viewer, operator, admin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: use viewer, operator or admin")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(raw: &str) -> std::result::Result<Self, Self::Err> {
        match raw {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(UnknownRole(other.to_owned())),
        }
    }
}

/// Why a bearer value is not an API key at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedKey {
    #[error("an API key starts with \"fpk_\"")]
    Prefix,
    #[error("an API key is {API_KEY_LEN} characters long")]
    Length,
    #[error("an API key is fpk_<16 hex digits>_<64 hex digits>")]
    Shape,
}

/// A bearer value with the shape of an API key (not yet checked against
/// the database). Its only constructor is [`ParsedApiKey::parse`].
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedApiKey<'a> {
    key_id: &'a str,
    whole: &'a str,
}

impl fmt::Debug for ParsedApiKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedApiKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl<'a> ParsedApiKey<'a> {
    /// Checks the shape of `raw`; touches nothing else.
    pub fn parse(raw: &'a str) -> std::result::Result<Self, MalformedKey> {
        let rest = raw.strip_prefix(API_KEY_PREFIX).ok_or(MalformedKey::Prefix)?;
        if raw.len() != API_KEY_LEN {
            return Err(MalformedKey::Length);
        }
        // Every byte is checked to be ASCII below, so these slices are on char boundaries.
        if !rest.is_ascii() {
            return Err(MalformedKey::Shape);
        }
        let (key_id, tail) = rest.split_at(KEY_ID_HEX);
        let secret = tail.strip_prefix('_').ok_or(MalformedKey::Shape)?;
        if !is_lower_hex(key_id) || !is_lower_hex(secret) {
            return Err(MalformedKey::Shape);
        }
        Ok(Self { key_id, whole: raw })
    }

    /// The public part: safe to log and to show.
    pub fn key_id(&self) -> &str {
        self.key_id
    }
}

fn hash_key(whole: &str) -> String {
    hex::encode(Sha256::digest(whole.as_bytes()))
}

/// A key as stored: everything but the secret, which is never stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiKey {
    pub name: String,
    pub key_id: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key just made: the only time its secret exists outside its holder.
pub struct IssuedApiKey {
    pub key: ApiKey,
    secret: String,
}

impl IssuedApiKey {
    /// The whole key (`fpk_…`), to hand to its holder once.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for IssuedApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedApiKey").field("key", &self.key).field("secret", &"<redacted>").finish()
    }
}

/// The verdict on a presented key.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyCheck {
    Valid(ApiKey),
    /// No key has this id, or the secret does not match it (not told apart to callers).
    Unknown,
    Expired(ApiKey),
    Revoked(ApiKey),
}

/// Checks a key name: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit.
pub fn check_key_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= MAX_KEY_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "key name {name:?} must be 1 to {MAX_KEY_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit"
        )))
    }
}

fn random_hex(bytes: usize) -> Result<String> {
    use rand::TryRngCore;
    let mut buffer = vec![0u8; bytes];
    rand::rngs::OsRng
        .try_fill_bytes(&mut buffer)
        .map_err(|error| Error::Invalid(format!("the operating system's random generator failed: {error}")))?;
    Ok(hex::encode(buffer))
}

fn api_key_from(m: api_keys::Model) -> Result<ApiKey> {
    Ok(ApiKey {
        role: m.role.parse().map_err(|error: UnknownRole| Error::Corrupt(format!("api key {}: {error}", m.name)))?,
        name: m.name,
        key_id: m.key_id,
        created_at: m.created_at,
        expires_at: m.expires_at,
        revoked_at: m.revoked_at,
    })
}

/// Who is acting: an API key (by name), an OIDC subject, or the
/// scheduler itself (an automatic promotion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    ApiKey,
    Jwt,
    Scheduler,
}

impl ActorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::ApiKey => "api_key",
            ActorKind::Jwt => "jwt",
            ActorKind::Scheduler => "scheduler",
        }
    }
}

/// One audited call, as the API appends it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEntry {
    pub at: DateTime<Utc>,
    /// The key's name or the token's subject.
    pub actor: String,
    pub actor_kind: ActorKind,
    pub role: Role,
    /// `POST`, `PUT`, …
    pub method: String,
    /// The matched route template: `/v1/rollouts/{id}/pause`.
    pub route: String,
    pub rollout_id: Option<Uuid>,
    /// The peer address (`ip:port`).
    pub source: String,
    /// The HTTP status of the answer.
    pub status: u16,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub actor_kind: ActorKind,
    pub role: Role,
    pub method: String,
    pub route: String,
    pub rollout_id: Option<Uuid>,
    pub source: String,
    pub status: u16,
}

/// A page of the audit log, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AuditQuery {
    pub rollout_id: Option<Uuid>,
    /// Only entries older than this id (the previous page's last id).
    pub before: Option<i64>,
    pub limit: u64,
}

fn audit_from(m: audit_log::Model) -> Result<AuditEntry> {
    let corrupt = |what: &str| Error::Corrupt(format!("audit entry {}: {what}", m.id));
    Ok(AuditEntry {
        id: m.id,
        at: m.at,
        actor_kind: match m.actor_kind.as_str() {
            "api_key" => ActorKind::ApiKey,
            "jwt" => ActorKind::Jwt,
            "scheduler" => ActorKind::Scheduler,
            other => return Err(corrupt(&format!("actor kind {other:?}"))),
        },
        role: m.role.parse().map_err(|error: UnknownRole| corrupt(&error.to_string()))?,
        status: u16::try_from(m.status).map_err(|_| corrupt("status"))?,
        actor: m.actor,
        method: m.method,
        route: m.route,
        rollout_id: m.rollout_id,
        source: m.source,
    })
}

impl Store {
    /// Makes a key. The name must be new ([`Error::Conflict`] otherwise);
    /// the secret is in the returned value only.
    pub async fn create_api_key(
        &self,
        name: &str,
        role: Role,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<IssuedApiKey> {
        check_key_name(name)?;
        let created_at = self.now();
        if let Some(expires_at) = expires_at {
            if expires_at <= created_at {
                return Err(Error::Invalid(format!("the expiry {expires_at} of key {name:?} is in the past")));
            }
        }
        if api_keys::Entity::find().filter(api_keys::Column::Name.eq(name)).one(&self.db).await?.is_some() {
            return Err(Error::Conflict(format!("an API key named {name:?} exists; revoke it or choose another name")));
        }
        let key_id = random_hex(KEY_ID_HEX / 2)?;
        let secret = format!("{API_KEY_PREFIX}{key_id}_{}", random_hex(SECRET_HEX / 2)?);
        let row = api_keys::ActiveModel {
            id: Set(Uuid::new_v4()),
            key_id: Set(key_id.clone()),
            name: Set(name.to_owned()),
            role: Set(role.as_str().to_owned()),
            secret_hash: Set(hash_key(&secret)),
            created_at: Set(created_at),
            expires_at: Set(expires_at),
            revoked_at: Set(None),
        };
        match api_keys::Entity::insert(row).exec(&self.db).await {
            Ok(_) => {}
            // Two creations of one name at once: the unique index decides.
            Err(error) if is_unique_violation(&error) => {
                return Err(Error::Conflict(format!(
                    "an API key named {name:?} exists; revoke it or choose another name"
                )))
            }
            Err(error) => return Err(error.into()),
        }
        let key = ApiKey { name: name.to_owned(), key_id, role, created_at, expires_at, revoked_at: None };
        Ok(IssuedApiKey { key, secret })
    }

    /// Every key, oldest first (revoked and expired ones included).
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        api_keys::Entity::find()
            .order_by_asc(api_keys::Column::CreatedAt)
            .order_by_asc(api_keys::Column::Name)
            .all(&self.db)
            .await?
            .into_iter()
            .map(api_key_from)
            .collect()
    }

    /// Revokes the key named `name` from now on; revoking it again keeps
    /// the first revocation time.
    pub async fn revoke_api_key(&self, name: &str) -> Result<ApiKey> {
        let at = self.now();
        api_keys::Entity::update_many()
            .col_expr(api_keys::Column::RevokedAt, sea_orm::sea_query::Expr::value(at))
            .filter(api_keys::Column::Name.eq(name))
            .filter(api_keys::Column::RevokedAt.is_null())
            .exec(&self.db)
            .await?;
        let row = api_keys::Entity::find()
            .filter(api_keys::Column::Name.eq(name))
            .one(&self.db)
            .await?
            .ok_or_else(|| Error::NotFound { what: "API key", id: name.to_owned() })?;
        api_key_from(row)
    }

    /// The verdict on a presented key at `at`: one indexed read by key id,
    /// then a constant-time comparison of the hashes.
    pub async fn check_api_key(&self, key: &ParsedApiKey<'_>, at: DateTime<Utc>) -> Result<KeyCheck> {
        let Some(row) = api_keys::Entity::find().filter(api_keys::Column::KeyId.eq(key.key_id)).one(&self.db).await?
        else {
            return Ok(KeyCheck::Unknown);
        };
        let presented = hash_key(key.whole);
        if !bool::from(presented.as_bytes().ct_eq(row.secret_hash.as_bytes())) {
            return Ok(KeyCheck::Unknown);
        }
        let stored = api_key_from(row)?;
        if stored.revoked_at.is_some() {
            return Ok(KeyCheck::Revoked(stored));
        }
        if stored.expires_at.is_some_and(|expires| expires <= at) {
            return Ok(KeyCheck::Expired(stored));
        }
        Ok(KeyCheck::Valid(stored))
    }

    /// Appends one entry to the audit log; returns its id.
    pub async fn append_audit(&self, entry: NewAuditEntry) -> Result<i64> {
        let row = audit_log::ActiveModel {
            id: sea_orm::ActiveValue::NotSet,
            at: Set(entry.at),
            actor: Set(entry.actor),
            actor_kind: Set(entry.actor_kind.as_str().to_owned()),
            role: Set(entry.role.as_str().to_owned()),
            method: Set(entry.method),
            route: Set(entry.route),
            rollout_id: Set(entry.rollout_id),
            source: Set(entry.source),
            status: Set(i32::from(entry.status)),
        };
        Ok(audit_log::Entity::insert(row).exec(&self.db).await?.last_insert_id)
    }

    /// A page of the audit log, newest first.
    pub async fn audit_entries(&self, query: AuditQuery) -> Result<Vec<AuditEntry>> {
        let mut select = audit_log::Entity::find();
        if let Some(rollout_id) = query.rollout_id {
            select = select.filter(audit_log::Column::RolloutId.eq(rollout_id));
        }
        if let Some(before) = query.before {
            select = select.filter(audit_log::Column::Id.lt(before));
        }
        select
            .order_by_desc(audit_log::Column::Id)
            .limit(query.limit.max(1))
            .all(&self.db)
            .await?
            .into_iter()
            .map(audit_from)
            .collect()
    }
}

fn is_unique_violation(error: &sea_orm::DbErr) -> bool {
    matches!(error.sql_err(), Some(sea_orm::SqlErr::UniqueConstraintViolation(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, secret: &str) -> String {
        format!("fpk_{id}_{secret}")
    }

    #[test]
    fn well_formed_keys_parse_and_name_their_id() {
        let raw = key(&"0a".repeat(8), &"f9".repeat(32));
        let parsed = ParsedApiKey::parse(&raw).unwrap();
        assert_eq!(parsed.key_id(), "0a".repeat(8));
        assert!(!format!("{parsed:?}").contains(&"f9".repeat(32)), "Debug never shows the secret");
    }

    #[test]
    fn malformed_keys_are_refused_by_shape() {
        let good_id = "0".repeat(16);
        let good_secret = "1".repeat(64);
        let cases = [
            (String::new(), MalformedKey::Prefix),
            ("Bearer abc".to_owned(), MalformedKey::Prefix),
            (key(&good_id, &good_secret).replace("fpk_", "fpx_"), MalformedKey::Prefix),
            (key(&good_id, &good_secret[1..]), MalformedKey::Length),
            (format!("{}0", key(&good_id, &good_secret)), MalformedKey::Length),
            (key(&good_id, &good_secret.replace('1', "G")), MalformedKey::Shape),
            (key(&good_id.to_uppercase().replace('0', "A"), &good_secret), MalformedKey::Shape),
            (format!("fpk_{good_id}-{good_secret}"), MalformedKey::Shape),
            (format!("fpk_{}é_{}", "0".repeat(14), good_secret), MalformedKey::Shape),
        ];
        for (raw, expected) in cases {
            assert_eq!(ParsedApiKey::parse(&raw).unwrap_err(), expected, "{raw:?}");
        }
    }

    #[test]
    fn roles_are_ordered_and_parse_from_their_names() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!("root".parse::<Role>().unwrap_err().to_string().contains("viewer, operator or admin"));
    }

    #[test]
    fn key_names_are_checked() {
        for good in ["ci", "grafana-reader", "team.ops_1"] {
            check_key_name(good).unwrap();
        }
        for bad in ["", "-x", "a b", "ключ", &"n".repeat(65)] {
            assert!(matches!(check_key_name(bad), Err(Error::Invalid(_))), "{bad:?}");
        }
    }
}
