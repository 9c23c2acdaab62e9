//! The rollout file's parser, shared by the CLI (`fleetpatch rollout create -f
//! rollout.yaml`) and the console's create page: YAML (or JSON, its subset)
//! with exactly the schema of `POST /v1/rollouts`, parsed into the API's own
//! request type so the three can never drift apart.
//!
//! Every error names the file, the line and the field
//! (`rollout.yaml:14:7: targets[2].port: invalid value ...`).

use std::fmt;

use super::CreateRollout;

/// A mistake in one of the user's input files, with where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct InputError {
    /// The file as the user named it.
    pub file: String,
    /// 1-based line and column, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The field (`targets[2].port`), when the mistake is in one.
    pub field: Option<String>,
    pub message: String,
}

impl InputError {
    pub fn at_line(file: &str, line: usize, message: impl Into<String>) -> Self {
        Self { file: file.to_owned(), line: Some(line), column: None, field: None, message: message.into() }
    }

    pub fn in_file(file: &str, message: impl Into<String>) -> Self {
        Self { file: file.to_owned(), line: None, column: None, field: None, message: message.into() }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for InputError {}

/// Parses a rollout file. `targets` may be left out when `targets_come_from_elsewhere`
/// (a CSV file or an inventory supplies them).
pub fn parse(text: &str, file: &str, targets_come_from_elsewhere: bool) -> Result<CreateRollout, InputError> {
    if text.trim().is_empty() {
        return Err(InputError::in_file(file, "the rollout file is empty; see docs/rollout-file.md for its schema"));
    }
    let deserializer = serde_norway::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, CreateRollout>(deserializer) {
        Ok(request) => Ok(request),
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let location = inner.location();
            let raw = inner.to_string();
            if targets_come_from_elsewhere
                && (path == "." || path.is_empty())
                && raw.contains("missing field `targets`")
            {
                // Every other field deserialized (missing fields are found last):
                // read it again with an empty target list appended. Appending keeps
                // every line number; a flow mapping (`{...}`, JSON) cannot be
                // appended to, and gets the original error with a hint.
                let padded = format!("{}\ntargets: []\n", text.trim_end());
                if let Ok(request) = serde_norway::from_str::<CreateRollout>(&padded) {
                    return Ok(request);
                }
                return Err(InputError {
                    file: file.to_owned(),
                    line: location.as_ref().map(|l| l.line()),
                    column: location.as_ref().map(|l| l.column()),
                    field: Some("targets".into()),
                    message: "is required but missing; write `targets: []` when every target is imported".into(),
                });
            }
            let (field, message) = field_and_message(&path, &raw);
            Err(InputError {
                file: file.to_owned(),
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
                field,
                message,
            })
        }
    }
}

/// Splits the YAML library's message into the field and what is wrong with
/// it: the location goes to line/column, the library's own path prefix is
/// dropped, and "missing field `x`" names `x` as the field.
fn field_and_message(path: &str, raw: &str) -> (Option<String>, String) {
    let mut message = raw;
    if let Some(at) = message.rfind(" at line ") {
        message = &message[..at];
    }
    // The YAML library prefixes its own path, which may stop at the parent
    // (`targets[0]: unknown field `hots``).
    if let Some((prefix, rest)) = message.split_once(": ") {
        if !prefix.is_empty() && path.starts_with(prefix) {
            message = rest;
        }
    }
    let path = if path == "." { "" } else { path };
    let mut field = (!path.is_empty()).then(|| path.to_owned());
    if let Some(name) = message.strip_prefix("missing field `").and_then(|rest| rest.split('`').next()) {
        field = Some(if path.is_empty() { name.to_owned() } else { format!("{path}.{name}") });
        message = "is required but missing";
    }
    (field, message.to_owned())
}
