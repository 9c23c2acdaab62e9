//! `apikey create | list | revoke`: API keys, made against the database
//! (`database.url`), not through the API. This is how the first admin key
//! comes to be: whoever can reach the database is an administrator
//! already, and no open endpoint makes keys.
//!
//! `create` prints the key once, on stdout, and nothing else there, so a
//! script can capture it (`KEY=$(fleetpatch apikey create …)`); what it
//! did goes to stderr. Only the key's SHA-256 is stored.
//!
//! [`ensure_admin_key_file`] is how `fleetpatch demo` and `fleetpatch all`
//! work out of the box: they keep their own admin key in a 0600 file and
//! say where it is (never the key itself).

use std::path::Path;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use fleetpatch_store::{KeyCheck, ParsedApiKey, Role, Store, StoreOptions};

use crate::exit::{self, Failure};
use crate::output::{self, OutputFormat, Table};

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Make a key and print it once on stdout (only its hash is stored).
    Create {
        /// A unique name (letters, digits, '.', '_', '-'): who or what holds the key.
        #[arg(long)]
        name: String,
        /// viewer (read), operator (also create, pause, resume, abort, retry, upload) or admin (also the audit log).
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Lifetime: 90d, 12h, 30m, 2w (never expires when left out).
        #[arg(long, value_parser = parse_lifetime, value_name = "DURATION")]
        expires: Option<chrono::Duration>,
    },
    /// List the keys (never the keys themselves).
    List {
        /// `table` for people, `json` for scripts.
        #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Revoke a key by name: from now on it is refused (401).
    Revoke { name: String },
}

fn parse_role(raw: &str) -> Result<Role, fleetpatch_store::auth::UnknownRole> {
    raw.parse()
}

/// Why `--expires` is not a lifetime; each message quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifetimeError {
    #[error("{0:?} is not a lifetime: write a number and a unit, e.g. 90d, 12h, 30m, 2w")]
    Malformed(String),
    #[error("{0:?}: a lifetime must be positive")]
    NotPositive(String),
    #[error("{0:?}: a lifetime is at most 100 years")]
    TooLong(String),
}

/// `90d`, `12h`, `30m`, `45s`, `2w`: a positive number and one unit.
pub fn parse_lifetime(raw: &str) -> Result<chrono::Duration, LifetimeError> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let bad = || LifetimeError::Malformed(raw.to_owned());
    let number: i64 = number.parse().map_err(|_| bad())?;
    if number <= 0 {
        return Err(LifetimeError::NotPositive(raw.to_owned()));
    }
    let seconds_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    number
        .checked_mul(seconds_per_unit)
        .filter(|s| *s <= 100 * 365 * 86_400)
        .map(chrono::Duration::seconds)
        .ok_or_else(|| LifetimeError::TooLong(raw.to_owned()))
}

fn store_failure(error: fleetpatch_store::Error) -> Failure {
    let code = match &error {
        fleetpatch_store::Error::Conflict(_)
        | fleetpatch_store::Error::Invalid(_)
        | fleetpatch_store::Error::NotFound { .. } => exit::INVALID,
        _ => exit::UNREACHABLE,
    };
    Failure::new(code, error.to_string())
}

fn state_of(key: &fleetpatch_store::ApiKey, now: DateTime<Utc>) -> String {
    match (key.revoked_at, key.expires_at) {
        (Some(at), _) => format!("revoked {}", output::time(at)),
        (None, Some(at)) if at <= now => format!("expired {}", output::time(at)),
        _ => "active".into(),
    }
}

/// Runs an `apikey` command against the configured database.
pub async fn run(command: ApiKeyCommand, database: &StoreOptions) -> Result<u8, Failure> {
    let store = Store::connect_migrated(database).await.map_err(store_failure)?;
    let result = match command {
        ApiKeyCommand::Create { name, role, expires } => {
            let expires_at = expires.map(|lifetime| Utc::now() + lifetime);
            let issued = store.create_api_key(&name, role, expires_at).await.map_err(store_failure)?;
            // stdout carries the key alone; everything said about it goes to stderr.
            println!("{}", issued.expose_secret());
            eprintln!(
                "created API key {name:?} (id {}, role {role}, {}); it is shown only now: keep it in a secret store",
                issued.key.key_id,
                expires_at.map(|at| format!("expires {}", output::time(at))).unwrap_or_else(|| "no expiry".into()),
            );
            Ok(exit::OK)
        }
        ApiKeyCommand::List { output: format } => {
            let keys = store.list_api_keys().await.map_err(store_failure)?;
            match format {
                OutputFormat::Json => {
                    let value = serde_json::json!({ "keys": keys });
                    println!("{}", output::json(&value));
                }
                OutputFormat::Table if keys.is_empty() => {
                    println!("no API keys; make one with `fleetpatch apikey create --name NAME --role ROLE`")
                }
                OutputFormat::Table => {
                    let now = Utc::now();
                    let mut table = Table::new(&["NAME", "ROLE", "KEY ID", "CREATED", "EXPIRES", "STATE"]);
                    for key in &keys {
                        table.push(vec![
                            key.name.clone(),
                            key.role.to_string(),
                            key.key_id.clone(),
                            output::time(key.created_at),
                            output::optional_time(key.expires_at),
                            state_of(key, now),
                        ]);
                    }
                    print!("{}", table.render(true, &table.widths()));
                }
            }
            Ok(exit::OK)
        }
        ApiKeyCommand::Revoke { name } => {
            let key = store.revoke_api_key(&name).await.map_err(store_failure)?;
            eprintln!(
                "revoked API key {name:?} (id {}) at {}",
                key.key_id,
                key.revoked_at.map(output::time).unwrap_or_default()
            );
            Ok(exit::OK)
        }
    };
    store.close().await;
    result
}

/// Keeps an admin key in `path` for a process that runs the API itself
/// (`demo`, `all`): the key already there when it is still a valid admin
/// key, else a new one named `<name_prefix>-<key id>` written with mode
/// 0600. Returns whether it made a new key.
pub async fn ensure_admin_key_file(store: &Store, path: &Path, name_prefix: &str) -> anyhow::Result<bool> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        if let Ok(parsed) = ParsedApiKey::parse(existing.trim()) {
            if let KeyCheck::Valid(key) = store.check_api_key(&parsed, Utc::now()).await? {
                if key.role == Role::Admin {
                    return Ok(false);
                }
            }
        }
    }
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let issued = store.create_api_key(&format!("{name_prefix}-{}", &suffix[..12]), Role::Admin, None).await?;
    write_secret_file(path, issued.expose_secret())?;
    Ok(true)
}

/// Writes `secret` to `path`, readable by its owner only (a file already
/// there is replaced, so an old mode does not survive).
pub fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("replacing {}", path.display())),
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, format!("{secret}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_have_a_number_and_a_unit() {
        assert_eq!(parse_lifetime("90d").unwrap(), chrono::Duration::days(90));
        assert_eq!(parse_lifetime("12h").unwrap(), chrono::Duration::hours(12));
        assert_eq!(parse_lifetime("2w").unwrap(), chrono::Duration::weeks(2));
        assert_eq!(parse_lifetime("45s").unwrap(), chrono::Duration::seconds(45));
        for bad in ["", "90", "d", "9x", "-1d", "0d", "1.5d", "99999999999999d"] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_lifetime("0d").unwrap_err().to_string(), "\"0d\": a lifetime must be positive");
        assert_eq!(parse_lifetime("99999999999999d").unwrap_err(), LifetimeError::TooLong("99999999999999d".into()));
        assert!(parse_lifetime("9x").unwrap_err().to_string().starts_with("\"9x\" is not a lifetime"));
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fp-keyfile-{}", uuid::Uuid::new_v4().simple()));
        let path = dir.join("admin.key");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret_file(&path, "fpk_new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "fpk_new\n");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
