//! The layout's rules that the compiler does not check, checked over the
//! workspace's own sources (vendored code and build output left out):
//!
//! * only `crates/store` (and the migrations) speak SQL: no other crate
//!   depends on sea-orm, and the store lends no raw connection;
//! * report intake is the collector's capability: only the collector (and
//!   the store's own tests and benches) call `Store::report_intake`;
//! * no source file is over 1,000 lines (split along its seams first);
//! * no internal interface returns `Result<_, String>`: errors have kinds.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// Every file under `dir` whose name ends with `suffix`, outside build
/// output, vendored code and hidden directories.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if path.is_dir() {
                if !(name.starts_with('.') || name == "target" || name == "vendor" || name == "node_modules") {
                    pending.push(path);
                }
            } else if name.ends_with(suffix) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

fn relative(path: &Path) -> String {
    path.strip_prefix(workspace()).unwrap_or(path).display().to_string()
}

fn sources() -> Vec<(String, String)> {
    let root = workspace();
    let mut all = Vec::new();
    for top in ["crates", "services", "tests", "proto", "migrations"] {
        for path in files(&root.join(top), ".rs") {
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            all.push((relative(&path), text));
        }
    }
    assert!(all.len() > 100, "found only {} source files under {}", all.len(), root.display());
    all
}

#[test]
fn only_the_store_and_the_migrations_depend_on_the_orm() {
    let root = workspace();
    let mut offenders = Vec::new();
    for manifest in files(&root, "Cargo.toml") {
        let name = relative(&manifest);
        if ["Cargo.toml", "crates/store/Cargo.toml", "migrations/Cargo.toml"].contains(&name.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&manifest).expect("manifest");
        if text.lines().any(|line| line.trim_start().starts_with("sea-orm")) {
            offenders.push(name);
        }
    }
    assert!(offenders.is_empty(), "these crates depend on sea-orm; only crates/store may issue SQL: {offenders:?}");
    let store = std::fs::read_to_string(root.join("crates/store/src/lib.rs")).expect("store");
    assert!(
        !store.contains("pub fn connection("),
        "the store lends its raw connection again: `Store::connection` must stay pub(crate)"
    );
}

#[test]
fn only_the_collector_takes_the_report_intake() {
    let allowed =
        ["services/collector/src/", "crates/store/src/", "crates/store/benches/", "tests/tests/architecture.rs"];
    let offenders: Vec<String> = sources()
        .into_iter()
        .filter(|(path, text)| text.contains(".report_intake()") && !allowed.iter().any(|a| path.starts_with(a)))
        .map(|(path, _)| path)
        .collect();
    assert!(offenders.is_empty(), "only the collector applies agents' reports; these take the intake: {offenders:?}");
}

#[test]
fn no_source_file_is_over_a_thousand_lines() {
    let long: Vec<(String, usize)> = sources()
        .into_iter()
        .map(|(path, text)| (path, text.lines().count()))
        .filter(|(_, lines)| *lines > 1_000)
        .collect();
    assert!(long.is_empty(), "split these along their seams: {long:?}");
}

/// `Result<T, String>` with any `T` (nested generics included), as written
/// in a signature.
fn string_errors(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("Result<") {
        let after = &rest[start + "Result<".len()..];
        let mut depth = 1usize;
        let mut end = None;
        for (index, c) in after.char_indices() {
            match c {
                '<' => depth += 1,
                '>' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(index);
                        break;
                    }
                }
                '\n' | ';' | '{' => break,
                _ => {}
            }
        }
        if let Some(end) = end {
            let inner = &after[..end];
            // The error type: after the last comma at depth 0.
            let mut depth = 0usize;
            let mut split = None;
            for (index, c) in inner.char_indices() {
                match c {
                    '<' | '(' => depth += 1,
                    '>' | ')' => depth = depth.saturating_sub(1),
                    ',' if depth == 0 => split = Some(index),
                    _ => {}
                }
            }
            if let Some(split) = split {
                if inner[split + 1..].trim() == "String" {
                    found.push(format!("Result<{inner}>"));
                }
            }
        }
        rest = &rest[start + 1..];
    }
    found
}

#[test]
fn the_string_error_finder_finds_what_it_should() {
    assert_eq!(string_errors("fn f() -> Result<(), String> {"), ["Result<(), String>"]);
    assert_eq!(string_errors("fn f() -> Result<Result<Identity, String>, Refusal> {"), ["Result<Identity, String>"]);
    assert!(string_errors("fn f() -> Result<String, Error> {").is_empty());
    assert!(string_errors("fn f() -> Result<HashMap<String, String>> {").is_empty());
}

#[test]
fn no_interface_returns_string_errors() {
    let mut offenders = Vec::new();
    for (path, text) in sources() {
        if path.starts_with("tests/tests/architecture.rs") {
            continue;
        }
        for found in string_errors(&text) {
            offenders.push(format!("{path}: {found}"));
        }
    }
    assert!(offenders.is_empty(), "give these errors a type with kinds (thiserror): {offenders:#?}");
}
