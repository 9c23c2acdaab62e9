//! A target's named credential resolved for use: looked up, its scope
//! checked before its secret is read, the secret parsed (`user:password`,
//! a password for a configured user, or a PEM/OpenSSH key).

use fleetpatch_runtime::credentials::{self, Credentials, ScopeTarget};
use fleetpatch_transport::{Credential, Secret};

/// The credential `name` for `target`: looked up in `defined`, its scope
/// checked (transport, host, labels) **before** its secret is read, then
/// the secret read and parsed. Every error names the credential and the
/// target, never the secret's text.
pub fn resolve_credential(
    defined: &Credentials,
    name: &str,
    target: ScopeTarget<'_>,
) -> Result<Credential, ResolveCredentialError> {
    let definition = credentials::lookup(defined, name)?;
    definition.check_scope(name, target)?;
    let secret = fleetpatch_runtime::secrets::resolve(&definition.secret_ref)
        .map_err(|source| ResolveCredentialError::Secret { name: name.to_owned(), source })?;
    parse_credential(&secret, definition.user.as_deref(), target.labels.get("user").map(String::as_str))
        .map_err(|source| ResolveCredentialError::Format { name: name.to_owned(), source })
}

/// Why a target's credential cannot be used. Each message names the
/// credential, never the secret's text. None of them goes away by trying
/// again with the same configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveCredentialError {
    /// No credential of that name, or the target is outside its scope.
    #[error(transparent)]
    Scope(#[from] credentials::CredentialError),
    /// Its secret reference cannot be read.
    #[error("credential {name:?}: {source}")]
    Secret {
        name: String,
        #[source]
        source: fleetpatch_runtime::secrets::SecretError,
    },
    /// The secret is not a usable credential.
    #[error("credential {name:?}: {source}")]
    Format {
        name: String,
        #[source]
        source: SecretFormatError,
    },
}

/// Why a secret is no usable credential. No variant holds any of the
/// secret's text: a misconfigured reference may point at anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretFormatError {
    #[error(
        "the secret is a private key, which needs a user: set `user` in the credential's definition (or give \
         the target the label `user`)"
    )]
    KeyWithoutUser,
    #[error(
        "the secret is neither `user:password` nor a PEM private key (with `user` set in the credential's \
         definition, the whole secret is the password)"
    )]
    NotUserPassword,
    #[error("the user name before `:` in the secret is unusable ({0}); is the reference the right file or variable?")]
    BadUser(&'static str),
    #[error("the password in the secret is empty")]
    EmptyPassword,
}

/// A resolved secret as a credential. With `configured_user` (the
/// definition's `user`) the secret is the password or the PEM/OpenSSH key
/// as a whole; without it, a key takes the target's `user` label and a
/// password secret must be `user:password`.
pub fn parse_credential(
    secret: &str,
    configured_user: Option<&str>,
    user_label: Option<&str>,
) -> Result<Credential, SecretFormatError> {
    if secret.trim_start().starts_with("-----BEGIN") {
        let username = configured_user.or(user_label).ok_or(SecretFormatError::KeyWithoutUser)?;
        credentials::check_user_name(username).map_err(SecretFormatError::BadUser)?;
        return Ok(Credential::PrivateKey {
            username: username.to_owned(),
            key_pem: Secret::new(secret),
            passphrase: None,
        });
    }
    let (username, password) = match configured_user {
        Some(user) => (user, secret),
        None => secret.split_once(':').ok_or(SecretFormatError::NotUserPassword)?,
    };
    credentials::check_user_name(username).map_err(SecretFormatError::BadUser)?;
    if password.is_empty() {
        return Err(SecretFormatError::EmptyPassword);
    }
    Ok(Credential::Password { username: username.to_owned(), password: Secret::new(password) })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn credentials_parse_and_never_show_the_secret() {
        let credential = parse_credential("admin:pa:ss", None, None).unwrap();
        assert!(!format!("{credential:?}").contains("pa:ss"));
        assert!(matches!(credential, Credential::Password { ref username, .. } if username == "admin"));
        assert_eq!(parse_credential("nopassword", None, None).unwrap_err(), SecretFormatError::NotUserPassword);
        let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nMARKER\n";
        assert_eq!(parse_credential(key, None, None).unwrap_err(), SecretFormatError::KeyWithoutUser);
        let from_label = parse_credential(key, None, Some("deploy")).unwrap();
        assert!(matches!(from_label, Credential::PrivateKey { ref username, .. } if username == "deploy"));
        let configured = parse_credential(key, Some("root"), Some("deploy")).unwrap();
        assert!(matches!(configured, Credential::PrivateKey { ref username, .. } if username == "root"));
        // With a configured user, the whole secret is the password, colons included.
        let whole = parse_credential("pa:ss", Some("CORP\\deploy"), None).unwrap();
        assert!(
            matches!(whole, Credential::Password { ref username, ref password } if username == "CORP\\deploy" && password.expose() == "pa:ss")
        );
    }

    #[test]
    fn credential_errors_name_the_credential() {
        let labels = BTreeMap::new();
        let target = ScopeTarget { transport: "ssh", host: "db-1.corp.example", labels: &labels };
        let definition = |secret_ref: &str| credentials::CredentialDefinition {
            secret_ref: secret_ref.into(),
            user: None,
            transports: vec!["ssh".into()],
            hosts: vec!["*.corp.example".into()],
            labels: BTreeMap::new(),
        };
        let defined = Credentials::from([
            ("unset".to_owned(), definition("env:FP_WORKER_TEST_UNSET_VARIABLE")),
            ("dir".to_owned(), definition("file:/")),
        ]);
        let error = resolve_credential(&defined, "other", target).unwrap_err();
        assert!(matches!(error, ResolveCredentialError::Scope(credentials::CredentialError::Unknown { .. })));
        assert!(error.to_string().contains("no credential is named \"other\""), "{error}");
        let error = resolve_credential(&defined, "unset", target).unwrap_err();
        assert!(matches!(error, ResolveCredentialError::Secret { .. }), "{error:?}");
        assert!(error.to_string().starts_with("credential \"unset\": secret reference"), "{error}");
        let outside = ScopeTarget { host: "evil.example", ..target };
        let error = resolve_credential(&defined, "unset", outside).unwrap_err();
        assert!(error.to_string().contains("may not be used for host \"evil.example\""), "{error}");
        let error = resolve_credential(&defined, "dir", target).unwrap_err();
        assert!(error.to_string().starts_with("credential \"dir\": secret reference \"file:/\""), "{error}");
    }

    #[test]
    fn secret_format_errors_never_echo_the_secret() {
        // What /proc/self/environ or a random file would look like.
        for secret in [
            "PATH=/usr/MARKER:/bin",
            "MARKER",
            "\u{0}MARKER\u{0}:x",
            "MARKER line one\nline two:rest",
            "MARKER:",
            "-----BEGIN MARKER",
        ] {
            let error = parse_credential(secret, None, None).unwrap_err();
            let text = format!("{error} {error:?}");
            assert!(!text.contains("MARKER"), "{secret:?} echoed in {text}");
        }
    }
}
