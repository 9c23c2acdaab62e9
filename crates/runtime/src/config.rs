//! Layered configuration: defaults < file (`--config`) < environment
//! (`FLEETPATCH__SECTION__KEY`). Unknown keys are refused, and every error
//! names the key.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{Error, Result};

/// Prefix of the environment variables (`FLEETPATCH__DATABASE__URL`).
pub const ENV_PREFIX: &str = "FLEETPATCH";

/// Loads `T` from its defaults, then `file`, then the environment.
pub fn load<T: DeserializeOwned + Serialize + Default>(file: Option<&Path>) -> Result<T> {
    load_from_env(file, std::env::vars())
}

/// Like [`load`], with the environment given (for tests).
pub fn load_from_env<T: DeserializeOwned + Serialize + Default>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T> {
    let defaults = ::config::Config::try_from(&T::default()).map_err(|e| Error::Config(e.to_string()))?;
    let mut builder = ::config::Config::builder().add_source(defaults);
    if let Some(path) = file {
        if !path.exists() {
            return Err(Error::Config(format!("configuration file {} does not exist", path.display())));
        }
        builder = builder.add_source(::config::File::from(path).format(::config::FileFormat::Toml));
    }
    let prefix = format!("{ENV_PREFIX}__");
    let source: ::config::Map<String, String> = env.into_iter().filter(|(key, _)| key.starts_with(&prefix)).collect();
    builder = builder.add_source(
        ::config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(source)),
    );
    let merged = builder.build().map_err(|e| Error::Config(e.to_string()))?;
    serde_path_to_error_free(merged)
}

fn serde_path_to_error_free<T: DeserializeOwned>(merged: ::config::Config) -> Result<T> {
    merged.try_deserialize().map_err(|error| {
        let text = error.to_string();
        Error::Config(if text.contains("unknown field") {
            format!("{text} (check the spelling of the key in the file or the FLEETPATCH__SECTION__KEY variable)")
        } else {
            text
        })
    })
}

/// The effective configuration as TOML, for `--print-config`, with every
/// password in a URL and every secret value masked
/// ([`crate::redact::redact_config`]); references (`env:`, `file:`) stay.
pub fn to_toml<T: Serialize>(value: &T) -> Result<String> {
    let mut tree = toml::Value::try_from(value).map_err(|e| Error::Config(e.to_string()))?;
    crate::redact::redact_config(&mut tree);
    toml::to_string_pretty(&tree).map_err(|e| Error::Config(e.to_string()))
}

/// A configuration value that breaks a rule. Every variant names the key at
/// fault in full (`collector.writers`, `scheduler.http.tls.cert_file`) and
/// says what the value must be; the binary prints it after "invalid
/// configuration: ". Each service's and transport's `validate()` returns
/// it; options that do not know where they sit in the file (a transport's
/// section) name their own key and the caller adds the section with
/// [`ConfigError::in_section`]; `[credentials]` keys are whole already.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A number below the least value allowed.
    #[error("{field} must be at least {min}")]
    TooSmall { field: String, min: u64 },
    /// A number above the greatest value allowed.
    #[error("{field} must be at most {max}")]
    TooLarge { field: String, max: u64 },
    /// A number outside an inclusive range.
    #[error("{field} must be between {min} and {max}")]
    OutOfRange { field: String, min: u64, max: u64 },
    /// Any other rule: `reason` follows the key and says what the value
    /// must be (`must be "text" or "json", got "xml"`).
    #[error("{field} {reason}")]
    Invalid { field: String, reason: String },
    /// The TLS certificate or key of the HTTP server of `section`
    /// (`collector.http`) cannot be used.
    #[error("{section}.tls.{source}")]
    Tls {
        section: String,
        #[source]
        source: Box<crate::http::TlsKeyError>,
    },
    /// A `[credentials.<name>]` definition is wrong (its message names the key).
    #[error(transparent)]
    Credential(#[from] crate::credentials::CredentialError),
}

impl ConfigError {
    pub fn too_small(field: impl Into<String>, min: u64) -> Self {
        Self::TooSmall { field: field.into(), min }
    }

    pub fn too_large(field: impl Into<String>, max: u64) -> Self {
        Self::TooLarge { field: field.into(), max }
    }

    pub fn out_of_range(field: impl Into<String>, min: u64, max: u64) -> Self {
        Self::OutOfRange { field: field.into(), min, max }
    }

    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.into(), reason: reason.into() }
    }

    /// The key at fault, in full.
    pub fn field(&self) -> String {
        match self {
            Self::TooSmall { field, .. }
            | Self::TooLarge { field, .. }
            | Self::OutOfRange { field, .. }
            | Self::Invalid { field, .. } => field.clone(),
            Self::Tls { section, source } => format!("{section}.tls.{}", source.field()),
            Self::Credential(crate::credentials::CredentialError::Invalid { key, .. }) => key.clone(),
            Self::Credential(_) => "credentials".into(),
        }
    }

    /// The same error with `section.` before the key (`port` becomes
    /// `smb.port`).
    pub fn in_section(self, section: &str) -> Self {
        match self {
            Self::TooSmall { field, min } => Self::TooSmall { field: format!("{section}.{field}"), min },
            Self::TooLarge { field, max } => Self::TooLarge { field: format!("{section}.{field}"), max },
            Self::OutOfRange { field, min, max } => Self::OutOfRange { field: format!("{section}.{field}"), min, max },
            Self::Invalid { field, reason } => Self::Invalid { field: format!("{section}.{field}"), reason },
            Self::Tls { section: inner, source } => Self::Tls { section: format!("{section}.{inner}"), source },
            // Credentials are a top-level table: their keys are already whole.
            Self::Credential(error) => Self::Credential(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Section {
        port: u16,
        name: String,
    }

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Root {
        section: Section,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn environment_overrides_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("fp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[section]\nport = 10\nname = \"file\"\n").unwrap();
        let root: Root = load_from_env(Some(&file), env(&[("FLEETPATCH__SECTION__PORT", "20")])).unwrap();
        assert_eq!(root, Root { section: Section { port: 20, name: "file".into() } });
        let root: Root = load_from_env(None, env(&[])).unwrap();
        assert_eq!(root, Root::default());
    }

    #[test]
    fn a_bad_value_names_the_key() {
        let error = load_from_env::<Root>(None, env(&[("FLEETPATCH__SECTION__PORT", "many")])).unwrap_err();
        assert!(error.to_string().contains("section.port"), "{error}");
        let error = load_from_env::<Root>(None, env(&[("FLEETPATCH__SECTION__PROT", "1")])).unwrap_err();
        assert!(error.to_string().contains("prot"), "{error}");
    }

    #[test]
    fn printed_configuration_hides_url_passwords() {
        #[derive(Serialize)]
        struct Printed {
            url: String,
        }
        let text = to_toml(&Printed { url: "postgres://fp:MARKER@db/fp".into() }).unwrap();
        assert!(!text.contains("MARKER") && text.contains("postgres://fp:***@db/fp"), "{text}");
    }

    #[test]
    fn config_errors_name_the_key_and_the_rule() {
        let error = ConfigError::too_small("collector.writers", 1);
        assert_eq!(error.to_string(), "collector.writers must be at least 1");
        let error = ConfigError::out_of_range("watch_writers", 1, 64).in_section("scheduler");
        assert_eq!(error.to_string(), "scheduler.watch_writers must be between 1 and 64");
        assert_eq!(error.field(), "scheduler.watch_writers");
        let error = ConfigError::invalid("share", "must be a disk share, got \"IPC$\"").in_section("smb");
        assert_eq!(error.to_string(), "smb.share must be a disk share, got \"IPC$\"");
        assert!(matches!(error, ConfigError::Invalid { ref field, .. } if field == "smb.share"));
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = load_from_env::<Root>(Some(Path::new("/nonexistent/fp.toml")), env(&[])).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/fp.toml"), "{error}");
    }
}
