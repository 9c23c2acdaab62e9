//! What the tests of `deploy/`, `docker-compose.yml` and the `Dockerfile`
//! share: the repository and its files, the tools they run, the compose file
//! as written and the Dockerfile's stages.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_norway::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("the repository root")
}

pub fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A tool from `$FLEETPATCH_<NAME>` (`-` as `_`) or the PATH, or a panic
/// naming the tests that need it (`what`) and the command that installs it.
pub fn tool(name: &str, install: &str, what: &str) -> PathBuf {
    let variable = format!("FLEETPATCH_{}", name.to_uppercase().replace('-', "_"));
    if let Some(path) = std::env::var_os(variable) {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file());
    found.unwrap_or_else(|| panic!("`{name}` is required by {what} and was not found: {install} (.ci/run does this)"))
}

pub fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a tool in the repository with the compose variables unset, so that
/// their defaults apply.
pub fn tool_output(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(repo())
        .env_remove("FLEETPATCH_IMAGE")
        .env_remove("FLEETPATCH_COLLECTOR_URL")
        .env_remove("FLEETPATCH_SECRETS")
        .env_remove("COMPOSE_FILE")
        .env_remove("COMPOSE_PROJECT_NAME")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

// ---------------------------------------------------------------------------
// The compose file.

/// `docker-compose.yml` with its merge keys (`<<: *fleetpatch`) applied.
pub fn compose() -> Value {
    let mut value: Value = serde_norway::from_str(&read("docker-compose.yml")).expect("docker-compose.yml is YAML");
    value.apply_merge().expect("its merge keys resolve");
    value
}

pub fn services(compose: &Value) -> Vec<String> {
    compose["services"].as_mapping().expect("services").keys().map(|k| k.as_str().unwrap().to_owned()).collect()
}

/// The services that run the image of the top-level Dockerfile.
pub fn fleetpatch_services(compose: &Value) -> Vec<String> {
    services(compose).into_iter().filter(|name| compose["services"][name.as_str()]["build"] == ".").collect()
}

pub fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        Value::Bool(flag) => flag.to_string(),
        other => panic!("a scalar, not {other:?}"),
    }
}

pub fn strings(value: &Value) -> Vec<String> {
    value.as_sequence().map(|items| items.iter().map(scalar).collect()).unwrap_or_default()
}

/// Compose's interpolation: `$$` is a `$`, `${NAME:-default}` is `vars[NAME]`
/// or else the default. Any other `$` form fails the test: the value the
/// container gets would then depend on the shell that runs `docker compose`.
pub fn interpolate(text: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let braced = rest.strip_prefix('{').unwrap_or_else(|| panic!("{text:?}: only $$ and ${{NAME:-default}}"));
        let end = braced.find('}').unwrap_or_else(|| panic!("{text:?}: an unclosed ${{"));
        let (name, default) =
            braced[..end].split_once(":-").unwrap_or_else(|| panic!("{text:?}: every variable needs a default"));
        out.push_str(vars.get(name).map(String::as_str).unwrap_or(default));
        rest = &braced[end + 1..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------
// The Dockerfile.

#[derive(Debug)]
pub struct CopyStep {
    pub from: Option<String>,
    pub chmod: Option<String>,
    pub sources: Vec<String>,
    pub dest: String,
}

#[derive(Debug)]
pub struct RunStep {
    pub text: String,
    /// Whether the build context had been copied into the stage before it.
    pub has_context: bool,
}

#[derive(Debug, Default)]
pub struct Stage {
    pub name: String,
    pub image: String,
    pub workdir: String,
    pub env: BTreeMap<String, String>,
    pub runs: Vec<RunStep>,
    pub copies: Vec<CopyStep>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

pub fn absolute(base: &str, path: &str) -> String {
    if path == "." {
        base.to_owned()
    } else if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{}", base.trim_end_matches('/'), path.trim_start_matches("./")).trim_end_matches('/').to_owned()
    }
}

/// The Dockerfile's stages: comments dropped, continued lines joined.
pub fn dockerfile() -> Vec<Stage> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for instruction in instructions {
        let (keyword, args) = instruction.split_once(' ').expect("an instruction with arguments");
        let args = args.trim();
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                [_] => String::new(),
                _ => panic!("FROM {args}"),
            };
            stages.push(Stage { name, image: words[0].to_owned(), workdir: "/".into(), ..Stage::default() });
            continue;
        }
        let stage = stages.last_mut().expect("FROM comes first");
        match keyword.as_str() {
            "WORKDIR" => stage.workdir = absolute(&stage.workdir, args),
            "ENV" => {
                for pair in args.split_whitespace() {
                    let (key, value) = pair.split_once('=').expect("ENV KEY=value");
                    stage.env.insert(key.to_owned(), value.trim_matches('"').to_owned());
                }
            }
            "RUN" => {
                let has_context = stage.copies.iter().any(|c| c.from.is_none() && c.sources == ["."]);
                let text = args.split_whitespace().filter(|w| !w.starts_with("--mount=")).collect::<Vec<_>>().join(" ");
                stage.runs.push(RunStep { text, has_context });
            }
            "COPY" => {
                let mut words: Vec<&str> = args.split_whitespace().collect();
                let (mut from, mut chmod) = (None, None);
                while words[0].starts_with("--") {
                    let flag = words.remove(0);
                    if let Some(stage) = flag.strip_prefix("--from=") {
                        from = Some(stage.to_owned());
                    } else if let Some(mode) = flag.strip_prefix("--chmod=") {
                        chmod = Some(mode.to_owned());
                    } else {
                        panic!("COPY {flag}: teach this test what it means");
                    }
                }
                let dest = absolute(&stage.workdir, words.pop().expect("a destination"));
                let sources = words.into_iter().map(str::to_owned).collect();
                stage.copies.push(CopyStep { from, chmod, sources, dest });
            }
            "USER" => stage.user = Some(args.to_owned()),
            "ENTRYPOINT" => stage.entrypoint = serde_json::from_str(args).expect("ENTRYPOINT in exec form"),
            "CMD" => stage.cmd = serde_json::from_str(args).expect("CMD in exec form"),
            "EXPOSE" | "LABEL" | "ARG" | "STOPSIGNAL" | "HEALTHCHECK" => {}
            other => panic!("{other}: teach this test what it does (ADD, VOLUME and SHELL are not expected)"),
        }
    }
    stages
}
