//! Secret references: credentials never live in the database, the logs or
//! the bus, only references to where the secret is.
//!
//! * `env:NAME`: the environment variable `NAME`;
//! * `file:/path`: the file's content (a Kubernetes Secret mounted as a volume),
//!   without its trailing newline.

/// Resolves a reference; the error names the reference, never the secret.
pub fn resolve(reference: &str) -> Result<String, String> {
    if let Some(name) = reference.strip_prefix("env:") {
        return std::env::var(name)
            .map_err(|_| format!("secret reference {reference:?}: environment variable {name} is not set"));
    }
    if let Some(path) = reference.strip_prefix("file:") {
        return std::fs::read_to_string(path)
            .map(|text| text.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|error| format!("secret reference {reference:?}: cannot read {path}: {error}"));
    }
    Err(format!("secret reference {reference:?} must start with \"env:\" or \"file:\""))
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
        let error = resolve("env:FP_TEST_SECRET_MISSING").unwrap_err();
        assert!(error.contains("FP_TEST_SECRET_MISSING") && !error.contains("s3cret"), "{error}");
        assert!(resolve("vault:x").unwrap_err().contains("must start with"));
    }
}
