//! Named, scoped credentials: an administrator defines them where the
//! workers run (`[credentials.<name>]` in the configuration); a rollout
//! only *names* one.
//!
//! A definition holds a secret **reference** (`env:NAME` / `file:/path`,
//! resolved by a worker only when it uses the credential) and a scope:
//! the transports, the hosts (host-name patterns and CIDRs) and the labels
//! of the targets it may be used for. The scheduler refuses a rollout that
//! names an unknown credential; the worker calls [`CredentialDefinition::check_scope`]
//! before it reads the secret and before it opens any connection.
//!
//! How hosts match (deliberately strict, so that nothing a caller controls
//! or a resolver answers widens a scope):
//!
//! * A host written as an IP literal (`10.1.2.3`, `::1`, `[::1]`) matches
//!   only CIDR entries (`10.1.0.0/16`, or a bare address meaning `/32`,
//!   `/128`); IPv4-mapped IPv6 addresses count as their IPv4 address.
//! * A host name matches only name patterns. It is **never resolved** to
//!   be matched against a CIDR: the transport resolves the name again when
//!   it connects, so a DNS answer at check time proves nothing about the
//!   address the secret is then sent to (DNS rebinding). Scope a credential
//!   for names with name patterns, for addresses with CIDRs.
//! * Name patterns are compared case-insensitively, label by label, without
//!   the trailing dot; `*` matches any run of characters *within one label*
//!   (`*.corp.example` matches `a.corp.example`, not `a.b.corp.example`, and
//!   `web*` never matches `web.attacker.example`).
//! * A name that a resolver would read as a number (`127.1`, `0x7f.1`,
//!   `2130706433`: its last label is all digits or hex with `0x`) matches
//!   nothing: write such a host as a dotted-quad IP literal.
//! * The entry `*` alone allows every host, names and addresses.
//!
//! Labels narrow a scope (the target must carry every `key = value`), but
//! the caller of the API writes a target's labels, so a scope never rests
//! on labels alone: `hosts` must not be empty.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One `[credentials.<name>]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialDefinition {
    /// Where the secret is (`env:NAME` or `file:/path`), read by a worker
    /// only when it uses the credential: `user:password`, a password (with
    /// `user`), or a PEM/OpenSSH private key.
    pub secret_ref: String,
    /// The login user. When set, the whole secret is the password or the
    /// key; when absent, a password secret is `user:password` and a key
    /// takes the target's `user` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The transports (`ssh`, `smb`, `sim`) it may be used with.
    #[serde(default)]
    pub transports: Vec<String>,
    /// Host-name patterns (`*.corp.example`, `db-01.corp.example`), CIDRs
    /// (`10.1.0.0/16`) or IP addresses it may be used for; `*` is any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Labels the target must carry (all of them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The `[credentials]` table: name → definition.
pub type Credentials = BTreeMap<String, CredentialDefinition>;

/// What a scope is checked against: a target as the worker will reach it.
#[derive(Debug, Clone, Copy)]
pub struct ScopeTarget<'a> {
    pub transport: &'a str,
    pub host: &'a str,
    pub labels: &'a BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// A definition in the configuration is wrong; `key` is its full key.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// A rollout names a credential nobody defined.
    #[error(
        "no credential is named {name:?} (defined: {defined}); ask an administrator to define it under \
         [credentials.{name}] where the workers run"
    )]
    Unknown { name: String, defined: String },
    /// The credential exists but may not be used for this target.
    #[error("credential {name:?} may not be used for {what}: its scope allows {allowed}")]
    OutOfScope { name: String, what: String, allowed: String },
}

/// Names: lower-case letters, digits, `-` and `_`, starting with a letter
/// or digit, at most 64 characters (they travel in rollouts and the API).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Checks every definition; the error names the key
/// (`credentials.windows-admin.hosts[1]: ...`).
pub fn validate(credentials: &Credentials, known_transports: &[&str]) -> Result<(), CredentialError> {
    for (name, definition) in credentials {
        if !is_valid_name(name) {
            return Err(CredentialError::Invalid {
                key: format!("credentials.{name}"),
                message: "a credential name is 1 to 64 lower-case letters, digits, '-' or '_'".into(),
            });
        }
        definition.validate(name, known_transports)?;
    }
    Ok(())
}

/// Looks a name up; the error lists the names that exist.
pub fn lookup<'a>(credentials: &'a Credentials, name: &str) -> Result<&'a CredentialDefinition, CredentialError> {
    credentials.get(name).ok_or_else(|| CredentialError::Unknown {
        name: name.to_owned(),
        defined: if credentials.is_empty() {
            "none".into()
        } else {
            credentials.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
        },
    })
}

impl CredentialDefinition {
    /// Checks this definition (named `name` in the configuration).
    pub fn validate(&self, name: &str, known_transports: &[&str]) -> Result<(), CredentialError> {
        let invalid = |field: String, message: String| CredentialError::Invalid {
            key: format!("credentials.{name}.{field}"),
            message,
        };
        if !(self.secret_ref.starts_with("env:") && self.secret_ref.len() > 4 || self.secret_ref.starts_with("file:/"))
        {
            return Err(invalid(
                "secret_ref".into(),
                "must be a secret reference, env:NAME or file:/absolute/path, never the secret itself".into(),
            ));
        }
        if let Some(user) = &self.user {
            if let Err(message) = check_user_name(user) {
                return Err(invalid("user".into(), message.into()));
            }
        }
        if self.transports.is_empty() {
            return Err(invalid(
                "transports".into(),
                format!("must list the transports it may be used with ({})", known_transports.join(", ")),
            ));
        }
        for (i, transport) in self.transports.iter().enumerate() {
            if !known_transports.contains(&transport.as_str()) {
                return Err(invalid(
                    format!("transports[{i}]"),
                    format!("{transport:?} is not a transport; use one of {}", known_transports.join(", ")),
                ));
            }
        }
        if self.hosts.is_empty() {
            return Err(invalid(
                "hosts".into(),
                "must list the hosts it may be used for: name patterns (*.corp.example), CIDRs (10.1.0.0/16), or \
                 \"*\" for any host (labels alone are no scope: API callers write them)"
                    .into(),
            ));
        }
        for (i, host) in self.hosts.iter().enumerate() {
            HostPattern::parse(host).map_err(|error| invalid(format!("hosts[{i}]"), error.to_string()))?;
        }
        for key in self.labels.keys() {
            if key.is_empty() {
                return Err(invalid("labels".into(), "a label key must not be empty".into()));
            }
        }
        Ok(())
    }

    /// Whether the credential `name` may be used for `target`. Reads no
    /// secret: call it before [`crate::secrets::resolve`] and before any
    /// connection.
    pub fn check_scope(&self, name: &str, target: ScopeTarget<'_>) -> Result<(), CredentialError> {
        if !self.transports.iter().any(|t| t == target.transport) {
            return Err(CredentialError::OutOfScope {
                name: name.to_owned(),
                what: format!("the {} transport", target.transport),
                allowed: format!("the transports {}", self.transports.join(", ")),
            });
        }
        let host_allowed = self
            .hosts
            .iter()
            .filter_map(|pattern| HostPattern::parse(pattern).ok())
            .any(|pattern| pattern.matches(target.host));
        if !host_allowed {
            return Err(CredentialError::OutOfScope {
                name: name.to_owned(),
                what: format!("host {:?}", target.host),
                allowed: format!(
                    "the hosts {} (a host name never matches a CIDR: it is not resolved for the check)",
                    self.hosts.join(", ")
                ),
            });
        }
        for (key, value) in &self.labels {
            if target.labels.get(key) != Some(value) {
                return Err(CredentialError::OutOfScope {
                    name: name.to_owned(),
                    what: format!(
                        "host {:?} ({})",
                        target.host,
                        match target.labels.get(key) {
                            Some(other) => format!("its label {key} is {other:?}"),
                            None => format!("it has no label {key}"),
                        }
                    ),
                    allowed: format!("only targets labelled {}", self.labels_text()),
                });
            }
        }
        Ok(())
    }

    fn labels_text(&self) -> String {
        self.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
    }
}

/// A user name as it may appear in a definition or before the `:` of a
/// `user:password` secret: printable, no `:`/`=`/control characters, at most
/// 256 characters. Anything else is refused *without echoing it* (it may be
/// the text of a file that is not a credential at all).
pub fn check_user_name(user: &str) -> Result<(), &'static str> {
    if user.is_empty() {
        return Err("the user name is empty");
    }
    if user.chars().count() > 256 {
        return Err("the user name is longer than 256 characters");
    }
    if user.chars().any(|c| c.is_control() || c == ':' || c == '=' || c == '\u{7f}') {
        return Err("the user name holds a control character, ':' or '='");
    }
    Ok(())
}

/// One parsed `hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Network(ipnet::IpNet),
    /// Lower-case labels, each possibly with `*`.
    Name(Vec<String>),
}

/// Why a `hosts` entry is not a host pattern; each names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum HostPatternError {
    #[error("{0:?} is not a CIDR (10.1.0.0/16, fd00::/8)")]
    NotCidr(String),
    #[error(
        "{0:?} is not a host pattern: use a host name with `*` inside labels (*.corp.example), a CIDR \
         (10.1.0.0/16), an IP address, or \"*\""
    )]
    NotPattern(String),
    #[error("{0:?} looks like an IP address in a short form; write it as a CIDR or a full address")]
    ShortNumeric(String),
}

impl HostPattern {
    fn parse(raw: &str) -> Result<Self, HostPatternError> {
        let text = raw.trim();
        if text == "*" {
            return Ok(HostPattern::Any);
        }
        if text.contains('/') {
            return text
                .parse::<ipnet::IpNet>()
                .map(|net| HostPattern::Network(net.trunc()))
                .map_err(|_| HostPatternError::NotCidr(raw.to_owned()));
        }
        if let Ok(address) = text.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(HostPattern::Network(ipnet::IpNet::from(address.to_canonical())));
        }
        let name = text.trim_end_matches('.').to_ascii_lowercase();
        let labels: Vec<String> = name.split('.').map(str::to_owned).collect();
        let valid_label = |label: &String| {
            !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        };
        if name.is_empty() || !labels.iter().all(valid_label) {
            return Err(HostPatternError::NotPattern(raw.to_owned()));
        }
        if labels.last().is_some_and(|last| looks_numeric(last)) {
            return Err(HostPatternError::ShortNumeric(raw.to_owned()));
        }
        Ok(HostPattern::Name(labels))
    }

    fn matches(&self, host: &str) -> bool {
        match (self, Host::parse(host)) {
            (HostPattern::Any, _) => true,
            (HostPattern::Network(net), Host::Address(address)) => net.contains(&address),
            (HostPattern::Name(pattern), Host::Name(labels)) => {
                pattern.len() == labels.len() && pattern.iter().zip(&labels).all(|(p, l)| glob_label(p, l))
            }
            _ => false,
        }
    }
}

/// A target's host as the scope sees it.
enum Host {
    Address(IpAddr),
    Name(Vec<String>),
    /// Neither: a numeric short form, an empty label, a zone id, ... never
    /// matched by a name pattern or a CIDR.
    Unmatchable,
}

impl Host {
    fn parse(raw: &str) -> Host {
        let text = raw.trim();
        if let Ok(address) = text.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Host::Address(address.to_canonical());
        }
        let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let labels: Vec<String> = name.split('.').map(str::to_owned).collect();
        let valid = labels.iter().all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !valid || labels.last().is_some_and(|last| looks_numeric(last)) {
            return Host::Unmatchable;
        }
        Host::Name(labels)
    }
}

/// A label a resolver may read as a number (`1`, `0x7f`, `017`).
fn looks_numeric(label: &str) -> bool {
    label.bytes().all(|b| b.is_ascii_digit())
        || (label.len() > 2
            && label[..2].eq_ignore_ascii_case("0x")
            && label[2..].bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `*` within one label; everything else literal.
fn glob_label(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if text.len() < first.len() + last.len() || !text.starts_with(first) || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

impl fmt::Display for ScopeTarget<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via {}", self.host, self.transport)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSPORTS: [&str; 3] = ["sim", "ssh", "smb"];

    fn definition(hosts: &[&str]) -> CredentialDefinition {
        CredentialDefinition {
            secret_ref: "env:FP_TEST_CREDENTIAL".into(),
            user: None,
            transports: vec!["ssh".into(), "smb".into()],
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            labels: BTreeMap::new(),
        }
    }

    fn allowed(definition: &CredentialDefinition, transport: &str, host: &str, labels: &[(&str, &str)]) -> bool {
        let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        definition.check_scope("c", ScopeTarget { transport, host, labels: &labels }).is_ok()
    }

    #[test]
    fn cidrs_match_ip_literals_only() {
        let d = definition(&["10.1.0.0/16", "fd00::/8", "192.168.5.7"]);
        assert!(allowed(&d, "ssh", "10.1.200.3", &[]));
        assert!(!allowed(&d, "ssh", "10.2.0.1", &[]));
        assert!(allowed(&d, "ssh", "fd00::1", &[]));
        assert!(allowed(&d, "ssh", "[fd12::5]", &[]));
        assert!(!allowed(&d, "ssh", "fe80::1", &[]));
        assert!(allowed(&d, "ssh", "192.168.5.7", &[]));
        assert!(!allowed(&d, "ssh", "192.168.5.8", &[]));
        assert!(allowed(&d, "ssh", "::ffff:10.1.0.9", &[]), "an IPv4-mapped address is its IPv4 address");
        // A name is never resolved for the check, even one that resolves into the range.
        assert!(!allowed(&d, "ssh", "localhost", &[]));
        assert!(!allowed(&d, "ssh", "10.1.0.5.nip.io", &[]));
        // Short numeric forms a resolver would read as addresses match nothing.
        assert!(!allowed(&d, "ssh", "10.1", &[]));
        assert!(!allowed(&d, "ssh", "167837953", &[]));
        assert!(!allowed(&definition(&["127.0.0.0/8"]), "ssh", "0x7f.1", &[]));
    }

    #[test]
    fn name_patterns_match_within_one_label_case_insensitively() {
        let d = definition(&["*.corp.example", "web*"]);
        assert!(allowed(&d, "ssh", "a.corp.example", &[]));
        assert!(allowed(&d, "ssh", "A.Corp.Example.", &[]), "case and the trailing dot do not matter");
        assert!(!allowed(&d, "ssh", "a.b.corp.example", &[]), "* stays within one label");
        assert!(!allowed(&d, "ssh", "corp.example", &[]));
        assert!(!allowed(&d, "ssh", "a.corp.example.attacker.net", &[]));
        assert!(allowed(&d, "ssh", "web01", &[]));
        assert!(!allowed(&d, "ssh", "web.attacker.example", &[]), "web* never crosses a dot");
        assert!(!allowed(&d, "ssh", "10.0.0.1", &[]), "a name pattern never matches an address");
        let exact = definition(&["db-01.corp.example"]);
        assert!(allowed(&exact, "ssh", "db-01.corp.example", &[]));
        assert!(!allowed(&exact, "ssh", "db-011.corp.example", &[]));
        let middle = definition(&["web-*-prod.corp.example"]);
        assert!(allowed(&middle, "ssh", "web-7-prod.corp.example", &[]));
        assert!(allowed(&middle, "ssh", "web--prod.corp.example", &[]));
        assert!(!allowed(&middle, "ssh", "web-prod.corp.example", &[]));
    }

    #[test]
    fn the_star_entry_allows_every_host() {
        let d = definition(&["*"]);
        assert!(allowed(&d, "ssh", "anything.example", &[]));
        assert!(allowed(&d, "ssh", "127.0.0.1", &[]));
    }

    #[test]
    fn transports_and_labels_narrow_the_scope() {
        let mut d = definition(&["*.corp.example"]);
        d.labels.insert("site".into(), "paris".into());
        assert!(allowed(&d, "ssh", "a.corp.example", &[("site", "paris"), ("os", "linux")]));
        assert!(!allowed(&d, "ssh", "a.corp.example", &[("site", "lyon")]));
        assert!(!allowed(&d, "ssh", "a.corp.example", &[]));
        assert!(!allowed(&d, "sim", "a.corp.example", &[("site", "paris")]));
        let labels = BTreeMap::new();
        let error = d.check_scope("lin", ScopeTarget { transport: "sim", host: "h", labels: &labels }).unwrap_err();
        assert!(error.to_string().contains("the sim transport") && error.to_string().contains("ssh, smb"), "{error}");
        let error =
            d.check_scope("lin", ScopeTarget { transport: "ssh", host: "evil.test", labels: &labels }).unwrap_err();
        assert_eq!(
            error.to_string(),
            "credential \"lin\" may not be used for host \"evil.test\": its scope allows the hosts *.corp.example \
             (a host name never matches a CIDR: it is not resolved for the check)"
        );
        let error = d
            .check_scope("lin", ScopeTarget { transport: "ssh", host: "a.corp.example", labels: &labels })
            .unwrap_err();
        assert!(
            error.to_string().contains("it has no label site") && error.to_string().contains("site=paris"),
            "{error}"
        );
    }

    #[test]
    fn validation_names_the_key() {
        let mut credentials = Credentials::new();
        credentials.insert("ok".into(), definition(&["*.corp.example", "10.0.0.0/8", "::1"]));
        assert_eq!(validate(&credentials, &TRANSPORTS), Ok(()));
        let cases: Vec<(&str, CredentialDefinition, &str)> = vec![
            (
                "a",
                CredentialDefinition { secret_ref: "hunter2".into(), ..definition(&["*"]) },
                "credentials.a.secret_ref",
            ),
            (
                "a",
                CredentialDefinition { secret_ref: "file:relative".into(), ..definition(&["*"]) },
                "credentials.a.secret_ref",
            ),
            ("a", CredentialDefinition { transports: vec![], ..definition(&["*"]) }, "credentials.a.transports"),
            (
                "a",
                CredentialDefinition { transports: vec!["ssh".into(), "rdp".into()], ..definition(&["*"]) },
                "credentials.a.transports[1]",
            ),
            ("a", definition(&[]), "credentials.a.hosts"),
            ("a", definition(&["*.corp.example", "10.0.0.0/33"]), "credentials.a.hosts[1]"),
            ("a", definition(&["bad host"]), "credentials.a.hosts[0]"),
            ("a", definition(&["a..b"]), "credentials.a.hosts[0]"),
            ("a", definition(&["10.1"]), "credentials.a.hosts[0]"),
            ("a", CredentialDefinition { user: Some("a:b".into()), ..definition(&["*"]) }, "credentials.a.user"),
            ("Bad Name", definition(&["*"]), "credentials.Bad Name"),
        ];
        for (name, definition, key) in cases {
            let credentials = Credentials::from([(name.to_owned(), definition)]);
            let error = validate(&credentials, &TRANSPORTS).unwrap_err();
            assert!(matches!(&error, CredentialError::Invalid { key: k, .. } if k == key), "{key}: {error}");
        }
    }

    #[test]
    fn bad_host_patterns_name_the_entry() {
        let message = |raw: &str| HostPattern::parse(raw).unwrap_err().to_string();
        assert_eq!(message("10.0.0.0/33"), "\"10.0.0.0/33\" is not a CIDR (10.1.0.0/16, fd00::/8)");
        assert!(message("bad host").starts_with("\"bad host\" is not a host pattern: use a host name"));
        assert!(message("10.1").starts_with("\"10.1\" looks like an IP address in a short form"));
        assert_eq!(HostPattern::parse("a..b"), Err(HostPatternError::NotPattern("a..b".into())));
        let credentials = Credentials::from([("a".to_owned(), definition(&["*", "web 1"]))]);
        let error = validate(&credentials, &TRANSPORTS).unwrap_err().to_string();
        assert!(error.starts_with("credentials.a.hosts[1]: \"web 1\" is not a host pattern"), "{error}");
    }

    #[test]
    fn unknown_names_list_the_defined_ones() {
        let credentials = Credentials::from([("linux".to_owned(), definition(&["*"]))]);
        assert!(lookup(&credentials, "linux").is_ok());
        let error = lookup(&credentials, "windows").unwrap_err().to_string();
        assert!(error.contains("\"windows\"") && error.contains("defined: linux"), "{error}");
        assert!(lookup(&Credentials::new(), "x").unwrap_err().to_string().contains("defined: none"));
    }

    #[test]
    fn definitions_load_from_toml() {
        let text = r#"
            [credentials.windows-admin]
            secret_ref = "file:/run/secrets/windows-admin"
            transports = ["smb"]
            hosts = ["*.corp.example", "10.1.0.0/16"]
            labels = { site = "paris" }
        "#;
        #[derive(Deserialize)]
        struct Root {
            credentials: Credentials,
        }
        let root: Root = toml::from_str(text).unwrap();
        let definition = &root.credentials["windows-admin"];
        assert_eq!(definition.hosts, ["*.corp.example", "10.1.0.0/16"]);
        assert_eq!(definition.labels["site"], "paris");
        assert_eq!(validate(&root.credentials, &TRANSPORTS), Ok(()));
    }

    #[test]
    fn user_names_are_checked_without_echo() {
        assert!(check_user_name("CORP\\deploy").is_ok());
        assert!(check_user_name(".\\Administrator").is_ok());
        for bad in ["", "PATH=/usr/bin", "a\nb", "a:b"] {
            let message = check_user_name(bad).unwrap_err();
            assert!(bad.is_empty() || !message.contains(bad), "{message}");
        }
    }
}
