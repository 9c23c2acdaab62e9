//! Reading and validating `plan.json`.
//!
//! The plan is written by a worker, but the agent still treats it as input
//! from outside: every field it relies on is checked before anything runs,
//! and an error names the field (`patches[1].file`) and the offending value.
//! Installer file names must be plain names in the plan's own directory; a
//! separator or `..` would let a plan point the agent at any file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use fleetpatch_proto::plan::{DeploymentPlan, PLAN_VERSION};

use crate::Error;

/// A validated plan and the directory it was staged in.
#[derive(Debug)]
pub struct LoadedPlan {
    pub plan: DeploymentPlan,
    /// Absolute directory holding the plan and the installers.
    pub directory: PathBuf,
    /// Absolute path of the plan file itself.
    pub path: PathBuf,
}

impl LoadedPlan {
    /// Absolute path of a patch's installer.
    pub fn installer_path(&self, file_name: &str) -> PathBuf {
        self.directory.join(file_name)
    }
}

/// Read, parse and validate the plan at `path`.
pub fn load(path: &Path) -> Result<LoadedPlan, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        action: "read the plan",
        path: path.to_path_buf(),
        source,
    })?;
    let plan = parse(&text).map_err(|error| match error {
        Error::Plan { field, reason, .. } => Error::Plan { plan: path.display().to_string(), field, reason },
        other => other,
    })?;
    let path = std::path::absolute(path).map_err(|source| Error::Io {
        action: "resolve the plan path",
        path: path.to_path_buf(),
        source,
    })?;
    let directory = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    Ok(LoadedPlan { plan, directory, path })
}

/// Parse and validate plan text.
pub fn parse(text: &str) -> Result<DeploymentPlan, Error> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|error| Error::plan("(document)", format!("not valid JSON: {error}")))?;
    // The version decides how the rest is read, so check it before the shape:
    // a plan from a newer worker gets "version", not a confusing shape error.
    match value.get("version") {
        None => return Err(Error::plan("version", "missing (this agent reads version 1)")),
        Some(version) if version.as_u64() != Some(u64::from(PLAN_VERSION)) => {
            return Err(Error::plan(
                "version",
                format!("unsupported plan version {version}; this agent reads version {PLAN_VERSION}"),
            ));
        }
        Some(_) => {}
    }
    let plan: DeploymentPlan = serde_path_to_error::deserialize(value).map_err(|error| {
        let field = error.path().to_string();
        Error::plan(if field == "." { "(document)".to_owned() } else { field }, error.into_inner().to_string())
    })?;
    validate(&plan)?;
    Ok(plan)
}

fn validate(plan: &DeploymentPlan) -> Result<(), Error> {
    if plan.deployment_id.trim().is_empty() {
        return Err(Error::plan("deployment_id", "must not be empty"));
    }
    validate_collector_url(&plan.collector_url, plan.collector_ca_pem.as_deref())?;
    if plan.token.is_empty() {
        return Err(Error::plan("token", "must not be empty"));
    }
    if plan.token.chars().any(|c| c.is_control() || c == ' ') {
        // Never echo the token itself.
        return Err(Error::plan("token", "contains spaces or control characters"));
    }
    if plan.heartbeat_seconds == 0 {
        return Err(Error::plan("heartbeat_seconds", "must be at least 1"));
    }
    if plan.patches.is_empty() {
        return Err(Error::plan("patches", "the plan has no patches"));
    }
    let mut indexes = HashSet::new();
    let mut files = HashSet::new();
    for (position, patch) in plan.patches.iter().enumerate() {
        let field = |name: &str| format!("patches[{position}].{name}");
        if !indexes.insert(patch.index) {
            return Err(Error::plan(field("index"), format!("index {} appears twice", patch.index)));
        }
        if patch.name.trim().is_empty() {
            return Err(Error::plan(field("name"), "must not be empty"));
        }
        validate_file_name(&patch.file).map_err(|error| Error::plan(field("file"), error.to_string()))?;
        if !files.insert(patch.file.as_str()) {
            return Err(Error::plan(field("file"), format!("{:?} is used by two patches", patch.file)));
        }
        if patch.sha256.len() != 64 || !patch.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::plan(field("sha256"), format!("{:?} is not 64 hexadecimal digits", patch.sha256)));
        }
        if patch.success_codes.is_empty() {
            return Err(Error::plan(field("success_codes"), "must list at least one exit code (usually 0)"));
        }
        if patch.timeout_seconds == 0 {
            return Err(Error::plan(field("timeout_seconds"), "must be at least 1"));
        }
        if patch.arguments.contains(['\n', '\r', '\0']) {
            return Err(Error::plan(field("arguments"), "must be a single line"));
        }
        for (number, source) in patch.sources.iter().enumerate() {
            let url = crate::http::HttpUrl::parse_source(source)
                .map_err(|error| Error::plan(field(&format!("sources[{number}]")), error.to_string()))?;
            crate::http::Connector::for_peer(&url, plan.relay_ca_pem.as_deref(), crate::http::Peer::Relay)
                .map_err(|error| Error::plan(field(&format!("sources[{number}]")), error.to_string()))?;
        }
    }
    for (position, patch) in plan.patches.iter().enumerate() {
        let partial = format!("{}.part", patch.file);
        if !patch.sources.is_empty() && files.contains(partial.as_str()) {
            return Err(Error::plan(
                format!("patches[{position}].file"),
                format!("{partial:?}, another patch's file, is where this one is downloaded to"),
            ));
        }
    }
    if plan.download_timeout_seconds == 0 && plan.patches.iter().any(|patch| !patch.sources.is_empty()) {
        return Err(Error::plan("download_timeout_seconds", "must be at least 1"));
    }
    Ok(())
}

fn validate_collector_url(url: &str, ca_pem: Option<&str>) -> Result<(), Error> {
    let parsed =
        crate::http::CollectorUrl::parse(url).map_err(|error| Error::plan("collector_url", error.to_string()))?;
    crate::http::Connector::new(&parsed, ca_pem)
        .map(|_| ())
        .map_err(|error| Error::plan("collector_url", error.to_string()))
}

/// Why a patch's file name is refused (the message of its `file` field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileNameError {
    #[error("must not be empty")]
    Empty,
    #[error("{name:?} must not contain \"..\"")]
    DotDot { name: String },
    #[error("{name:?} must be a plain file name in the plan's directory (found {found:?})")]
    Separator { name: String, found: char },
    #[error("{name:?} contains control characters")]
    Control { name: String },
    #[error("an installer cannot be the plan itself")]
    IsThePlan,
}

/// A staged file name must be a plain name that is valid on every target OS.
fn validate_file_name(name: &str) -> Result<(), FileNameError> {
    if name.is_empty() {
        return Err(FileNameError::Empty);
    }
    if name == "." || name == ".." || name.contains("..") {
        return Err(FileNameError::DotDot { name: name.to_owned() });
    }
    if let Some(found) = name.chars().find(|c| matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')) {
        return Err(FileNameError::Separator { name: name.to_owned(), found });
    }
    if name.chars().any(char::is_control) {
        return Err(FileNameError::Control { name: name.to_owned() });
    }
    if name == fleetpatch_proto::plan::PLAN_FILE_NAME {
        return Err(FileNameError::IsThePlan);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid_plan() -> serde_json::Value {
        json!({
            "version": 1,
            "deployment_id": "fp-1",
            "target_id": "6f1c1b8e-8f6f-4f53-9d55-3a3f5e0c2a11",
            "collector_url": "http://collector:1072",
            "token": "secret-token",
            "heartbeat_seconds": 30,
            "reboot": "if_required",
            "patches": [{
                "index": 0,
                "name": "openssl",
                "file": "openssl.deb",
                "sha256": "a".repeat(64),
                "installer": "deb",
                "success_codes": [0],
                "reboot_codes": [],
                "timeout_seconds": 600
            }]
        })
    }

    fn error_for(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut plan = valid_plan();
        edit(&mut plan);
        parse(&plan.to_string()).expect_err("plan should be refused").to_string()
    }

    #[test]
    fn a_valid_plan_is_accepted() {
        let plan = parse(&valid_plan().to_string()).unwrap();
        assert_eq!(plan.patches.len(), 1);
        assert!(!plan.keep_files);
    }

    #[test]
    fn errors_name_the_field() {
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|p| p["version"] = json!(2)), "version"),
            (Box::new(|p| p["patches"][0]["installer"] = json!("apk")), "patches[0].installer"),
            (Box::new(|p| p["patches"][0]["file"] = json!("../etc/shadow")), "patches[0].file"),
            (Box::new(|p| p["patches"][0]["file"] = json!("a/b.deb")), "patches[0].file"),
            (Box::new(|p| p["patches"][0]["file"] = json!("C:evil.exe")), "patches[0].file"),
            (Box::new(|p| p["patches"][0]["sha256"] = json!("abc")), "patches[0].sha256"),
            (Box::new(|p| p["patches"][0]["success_codes"] = json!([])), "patches[0].success_codes"),
            (Box::new(|p| p["patches"][0]["timeout_seconds"] = json!(0)), "patches[0].timeout_seconds"),
            (Box::new(|p| p["heartbeat_seconds"] = json!(0)), "heartbeat_seconds"),
            (Box::new(|p| p["collector_url"] = json!("https://collector")), "collector_url"),
            (Box::new(|p| p["patches"] = json!([])), "patches"),
            (
                Box::new(|p| p["patches"][0]["sources"] = json!(["http://relay/x", "ftp://relay/x"])),
                "patches[0].sources[1]",
            ),
            (Box::new(|p| p["patches"][0]["sources"] = json!(["https://relay/x"])), "patches[0].sources[0]"),
            (
                Box::new(|p| {
                    p["patches"][0]["sources"] = json!(["http://relay/x"]);
                    p["download_timeout_seconds"] = json!(0);
                }),
                "download_timeout_seconds",
            ),
            (Box::new(|p| p.as_object_mut().unwrap().remove("token").map(drop).unwrap()), "token"),
        ];
        for (edit, field) in cases {
            let message = error_for(edit);
            assert!(message.contains(&format!("field `{field}`")), "{field}: {message}");
        }
    }

    #[test]
    fn file_name_errors_name_the_file() {
        assert_eq!(validate_file_name("a/b.deb"), Err(FileNameError::Separator { name: "a/b.deb".into(), found: '/' }));
        let message = validate_file_name("a/b.deb").unwrap_err().to_string();
        assert_eq!(message, "\"a/b.deb\" must be a plain file name in the plan's directory (found '/')");
        let message = error_for(|p| p["patches"][0]["file"] = json!("x..y"));
        assert!(message.contains("field `patches[0].file`: \"x..y\" must not contain \"..\""), "{message}");
    }

    #[test]
    fn download_sources_are_read() {
        let mut plan = valid_plan();
        plan["patches"][0]["sources"] = json!(["http://relay-paris:1073/v1/content/abc", "http://relay-lyon/x"]);
        plan["patches"][0]["size"] = json!(1234);
        let plan = parse(&plan.to_string()).unwrap();
        assert_eq!(plan.patches[0].sources.len(), 2);
        assert_eq!((plan.patches[0].size, plan.download_timeout_seconds), (1234, 600));
        let message = error_for(|p| p["patches"][0]["sources"] = json!(["https://relay/x"]));
        assert!(message.contains("an https:// relay needs"), "{message}");
        let message = error_for(|p| {
            let mut second = p["patches"][0].clone();
            second["index"] = json!(1);
            second["file"] = json!("openssl.deb.part");
            p["patches"].as_array_mut().unwrap().push(second);
            p["patches"][0]["sources"] = json!(["http://relay/x"]);
        });
        assert!(message.contains("field `patches[0].file`: \"openssl.deb.part\", another patch's file"), "{message}");
    }

    #[test]
    fn the_token_is_never_echoed() {
        let message = error_for(|p| p["token"] = json!("sec ret"));
        assert!(!message.contains("sec ret"), "{message}");
    }

    #[test]
    fn duplicate_indexes_are_refused() {
        let message = error_for(|p| {
            let mut second = p["patches"][0].clone();
            second["file"] = json!("other.deb");
            p["patches"].as_array_mut().unwrap().push(second);
        });
        assert!(message.contains("patches[1].index"), "{message}");
    }
}
