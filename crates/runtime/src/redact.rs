//! Redaction of secrets in what the services print: passwords in URLs
//! (`postgres://user:***@host/db`, `?password=***`) and values of keys that
//! hold secrets. `--print-config` goes through [`redact_config`]; every log
//! line or error that names a URL goes through [`url`].

/// What replaces a secret.
pub const MASK: &str = "***";

/// Query parameters whose value is a secret.
const SECRET_PARAMETERS: [&str; 7] = ["password", "pass", "pwd", "passwd", "secret", "token", "sslpassword"];

/// The URL with the password of its userinfo and the values of its secret
/// query parameters replaced by [`MASK`]. Text that is not a URL is
/// returned unchanged.
pub fn url(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else { return text.to_owned() };
    let authority_start = scheme_end + 3;
    let authority_end =
        text[authority_start..].find(['/', '?', '#']).map_or(text.len(), |offset| authority_start + offset);
    let authority = &text[authority_start..authority_end];
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..authority_start]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let rest = &text[authority_end..];
    match rest.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let (query, fragment) = match query.split_once('#') {
                Some((query, fragment)) => (query, Some(fragment)),
                None => (query, None),
            };
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if SECRET_PARAMETERS.contains(&key.to_ascii_lowercase().as_str()) => {
                        format!("{key}={MASK}")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
            if let Some(fragment) = fragment {
                out.push('#');
                out.push_str(fragment);
            }
        }
        None => out.push_str(rest),
    }
    out
}

/// Whether a configuration key names a secret *value* (not a reference to
/// one: `*_ref` keys hold `env:`/`file:` references and stay readable).
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key.ends_with("_ref") {
        return false;
    }
    ["password", "passphrase", "secret", "token", "api_key", "private_key"].iter().any(|word| key.contains(word))
}

/// Redacts a configuration tree in place: every string that is a URL (at
/// any depth), every value under a secret key, and every `env:`/`file:`
/// reference is left as it is (a reference is not a secret).
pub fn redact_config(value: &mut toml::Value) {
    match value {
        toml::Value::String(text) => *text = url(text),
        toml::Value::Array(items) => items.iter_mut().for_each(redact_config),
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                if is_secret_key(key) && matches!(item, toml::Value::String(_)) {
                    *item = toml::Value::String(MASK.into());
                } else {
                    redact_config(item);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_userinfo_are_masked() {
        assert_eq!(url("postgres://fp:s3cret@db:5432/fleetpatch"), "postgres://fp:***@db:5432/fleetpatch");
        assert_eq!(url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(url("amqps://u:p%40ss@host/vh"), "amqps://u:***@host/vh");
        // An '@' inside the password: the last '@' of the authority ends the userinfo.
        assert_eq!(url("postgres://u:p@ss@host/db"), "postgres://u:***@host/db");
        assert_eq!(url("postgres://user@host/db"), "postgres://user@host/db");
        assert_eq!(url("postgres://host/db"), "postgres://host/db");
        assert_eq!(url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(url("not a url"), "not a url");
        // An '@' after the authority is no userinfo.
        assert_eq!(url("http://host/path@x"), "http://host/path@x");
    }

    #[test]
    fn secret_query_parameters_are_masked() {
        assert_eq!(
            url("postgres://host/db?sslmode=require&password=s3cret#frag"),
            "postgres://host/db?sslmode=require&password=***#frag"
        );
        assert_eq!(url("http://h/?Token=abc&x=1"), "http://h/?Token=***&x=1");
    }

    #[test]
    fn configuration_trees_lose_their_secrets_but_keep_references() {
        let mut value: toml::Value = toml::from_str(
            r#"
            [database]
            url = "postgres://fp:MARKER1@db/fleetpatch"
            [amqp]
            url = "amqp://fp:MARKER2@mq/%2f"
            [worker]
            token_key_ref = "env:FLEETPATCH_TOKEN_KEY"
            collector_url = "http://u:MARKER3@collector:1072"
            [client]
            token = "MARKER4"
            [credentials.linux]
            secret_ref = "file:/run/secrets/linux"
            hosts = ["*.corp.example", "https://x:MARKER5@h"]
            "#,
        )
        .unwrap();
        redact_config(&mut value);
        let text = toml::to_string(&value).unwrap();
        for marker in ["MARKER1", "MARKER2", "MARKER3", "MARKER4", "MARKER5"] {
            assert!(!text.contains(marker), "{marker} in {text}");
        }
        assert!(text.contains("env:FLEETPATCH_TOKEN_KEY") && text.contains("file:/run/secrets/linux"), "{text}");
        assert!(text.contains("postgres://fp:***@db/fleetpatch"), "{text}");
    }
}
