//! Secret references: credentials never live in the database, the logs or
//! the bus, only references to where the secret is.
//!
//! * `env:NAME`: the environment variable `NAME`;
//! * `file:/path`: the file's content (a Kubernetes Secret mounted as a volume),
//!   without its trailing newline.
//!
//! Only administrators write references (the configuration's `*_ref` keys
//! and `[credentials.<name>].secret_ref`); nothing an API caller sends is
//! ever resolved here.

/// Why a reference could not be read. Every variant names the reference,
/// never the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret reference {reference:?}: environment variable {name} is not set")]
    NotSet { reference: String, name: String },
    #[error("secret reference {reference:?}: cannot read {path}: {reason}")]
    Unreadable { reference: String, path: String, reason: String },
    #[error("secret reference {reference:?} must start with \"env:\" or \"file:\"")]
    BadReference { reference: String },
}

/// Resolves a reference; the error names the reference, never the secret.
pub fn resolve(reference: &str) -> Result<String, SecretError> {
    if let Some(name) = reference.strip_prefix("env:") {
        return std::env::var(name)
            .map_err(|_| SecretError::NotSet { reference: reference.to_owned(), name: name.to_owned() });
    }
    if let Some(path) = reference.strip_prefix("file:") {
        return std::fs::read_to_string(path).map(|text| text.trim_end_matches(['\n', '\r']).to_owned()).map_err(
            |error| SecretError::Unreadable {
                reference: reference.to_owned(),
                path: path.to_owned(),
                // The kind only: an io::Error never holds the content, but
                // keep the message to what the operator needs.
                reason: error.kind().to_string(),
            },
        );
    }
    Err(SecretError::BadReference { reference: reference.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_from_env_and_file() {
        std::env::set_var("FP_TEST_SECRET_REF", "s3cret");
        assert_eq!(resolve("env:FP_TEST_SECRET_REF").unwrap(), "s3cret");
        let path = std::env::temp_dir().join(format!("fp-secret-{}", std::process::id()));
        std::fs::write(&path, "from-file\n").unwrap();
        assert_eq!(resolve(&format!("file:{}", path.display())).unwrap(), "from-file");
        let error = resolve("env:FP_TEST_SECRET_MISSING").unwrap_err().to_string();
        assert!(error.contains("FP_TEST_SECRET_MISSING") && !error.contains("s3cret"), "{error}");
        assert!(resolve("vault:x").unwrap_err().to_string().contains("must start with"));
        let error = resolve("file:/nonexistent/fp-secret").unwrap_err().to_string();
        assert!(error.contains("/nonexistent/fp-secret") && error.contains("not found"), "{error}");
    }
}
