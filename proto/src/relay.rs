//! Which relay a target pulls its installers from: rules that match a
//! target label (`site=paris`) to a relay's base URL, from the rollout or
//! from the workers' configuration (`worker.relays`), and what happens when
//! the relay cannot be reached.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most relay rules in a rollout or in `worker.relays`.
pub const MAX_RELAY_RULES: usize = 256;
/// Longest relay URL accepted.
pub const MAX_RELAY_URL_BYTES: usize = 512;

/// One rule: targets carrying the label `match` pull from the relay at `url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayRule {
    /// `label=value` a target must carry (e.g. `site=paris`), or `*` for every target.
    #[serde(rename = "match")]
    pub selector: String,
    /// Base URL of the relay (`http://relay-paris:1073`); installers are
    /// fetched from `{url}/v1/content/{sha256}`.
    pub url: String,
}

/// What a worker does when a target's relay does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayFallback {
    /// Push the installers over the target's transport, as without a relay
    /// (the reason is kept on the target).
    #[default]
    Push,
    /// Do not push: the deployment is retried like an unreachable target.
    Fail,
}

impl RelayFallback {
    pub fn is_push(&self) -> bool {
        *self == Self::Push
    }
}

/// Why a relay rule is refused; each message names the rule's part at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayRuleError {
    #[error("match {0:?} must be `label=value` (e.g. site=paris) or `*`")]
    Selector(String),
    #[error("url {0:?} must be an http:// or https:// URL of at most 512 bytes with a host, no credentials, query or fragment")]
    Url(String),
    #[error("at most {MAX_RELAY_RULES} relay rules, got {0}")]
    TooMany(usize),
}

impl RelayRule {
    /// Checks the rule; the URL's trailing slash is trimmed by [`RelayRule::base_url`].
    pub fn validate(&self) -> Result<(), RelayRuleError> {
        if self.selector != "*" {
            let valid = self.selector.split_once('=').is_some_and(|(label, value)| {
                !label.is_empty()
                    && !value.is_empty()
                    && label.len() <= 128
                    && value.len() <= 256
                    && !self.selector.chars().any(char::is_control)
            });
            if !valid {
                return Err(RelayRuleError::Selector(self.selector.clone()));
            }
        }
        let rest = self.url.strip_prefix("http://").or_else(|| self.url.strip_prefix("https://"));
        let valid = rest.is_some_and(|rest| {
            let authority = rest.split('/').next().unwrap_or_default();
            !authority.is_empty()
                && !authority.starts_with(':')
                && !authority.contains('@')
                && !rest.contains(['?', '#'])
                && !rest.chars().any(|c| c.is_control() || c.is_whitespace())
        });
        if !valid || self.url.len() > MAX_RELAY_URL_BYTES {
            return Err(RelayRuleError::Url(self.url.clone()));
        }
        Ok(())
    }

    /// Whether a target with these labels pulls from this relay.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        if self.selector == "*" {
            return true;
        }
        self.selector.split_once('=').is_some_and(|(label, value)| labels.get(label).is_some_and(|v| v == value))
    }

    /// The URL without a trailing slash.
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }

    /// Where an agent downloads the installer with this sha256 from this relay.
    pub fn content_url(&self, sha256: &str) -> String {
        format!("{}/v1/content/{sha256}", self.base_url())
    }
}

/// Checks a list of rules, naming the first bad one by its position.
pub fn validate_rules(rules: &[RelayRule]) -> Result<(), (usize, RelayRuleError)> {
    if rules.len() > MAX_RELAY_RULES {
        return Err((MAX_RELAY_RULES, RelayRuleError::TooMany(rules.len())));
    }
    rules.iter().enumerate().try_for_each(|(index, rule)| rule.validate().map_err(|error| (index, error)))
}

/// The relay of a target: the rollout's first matching rule, else the
/// configuration's first matching rule, else none (the installers are pushed).
pub fn relay_for<'a>(
    rollout_rules: &'a [RelayRule],
    configured_rules: &'a [RelayRule],
    labels: &BTreeMap<String, String>,
) -> Option<&'a RelayRule> {
    rollout_rules.iter().chain(configured_rules).find(|rule| rule.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(selector: &str, url: &str) -> RelayRule {
        RelayRule { selector: selector.into(), url: url.into() }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_rollouts_rules_win_then_the_configurations_in_order() {
        let rollout = [rule("site=paris", "http://relay-paris:1073/")];
        let configured = [rule("site=paris", "http://other:1073"), rule("*", "http://central:1073")];
        let paris = relay_for(&rollout, &configured, &labels(&[("site", "paris")])).unwrap();
        assert_eq!(paris.content_url("ab"), "http://relay-paris:1073/v1/content/ab");
        let lyon = relay_for(&rollout, &configured, &labels(&[("site", "lyon")])).unwrap();
        assert_eq!(lyon.base_url(), "http://central:1073");
        assert_eq!(relay_for(&rollout, &[], &labels(&[("site", "lyon")])), None);
        assert_eq!(relay_for(&rollout, &[], &labels(&[("city", "paris")])), None);
    }

    #[test]
    fn bad_rules_are_refused_naming_the_part() {
        for (selector, url) in [("site=paris", "http://r:1073"), ("*", "https://r/base"), ("a=b=c", "http://[::1]:1")] {
            rule(selector, url).validate().unwrap();
        }
        for selector in ["site", "=paris", "site=", "", "a=b\n"] {
            assert_eq!(rule(selector, "http://r").validate(), Err(RelayRuleError::Selector(selector.into())));
        }
        for url in ["ftp://r", "http://", "http://u@r", "http://r/?x", "http://r /", "r:1073", "http://:80"] {
            assert_eq!(rule("*", url).validate(), Err(RelayRuleError::Url(url.into())), "{url}");
        }
        let error = validate_rules(&[rule("*", "http://r"), rule("site", "http://r")]).unwrap_err();
        assert_eq!(error.0, 1);
        assert!(error.1.to_string().contains("label=value"), "{}", error.1);
    }

    #[test]
    fn the_fallback_reads_as_documented() {
        assert_eq!(serde_json::from_str::<RelayFallback>("\"fail\"").unwrap(), RelayFallback::Fail);
        assert!(RelayFallback::default().is_push());
        let parsed: RelayRule = serde_json::from_str(r#"{"match":"site=paris","url":"http://r:1073"}"#).unwrap();
        assert_eq!(parsed, rule("site=paris", "http://r:1073"));
        assert!(serde_json::from_str::<RelayRule>(r#"{"match":"*","url":"http://r","x":1}"#).is_err());
    }
}
