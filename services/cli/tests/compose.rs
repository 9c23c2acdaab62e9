//! The top-level `docker-compose.yml`. No Docker daemon runs on these
//! machines, so nothing here starts a container; what is checked instead:
//!
//! * the compose file follows the compose specification (`check-jsonschema
//!   --builtin-schema vendor.compose-spec`) and Debian's `docker-compose
//!   config` reads it (both refuse a misspelled key, so they are live);
//!   workers scale (no fixed name or host port), everything of fleetpatch
//!   waits for `migrate`, the broker and the database have health checks;
//! * each fleetpatch service runs as its container would: the image's entry
//!   point, `ENV` and files from the Dockerfile, the service's `environment`
//!   (interpolated as compose does), `entrypoint` and `command` as written,
//!   its secrets (made by `deploy/compose/make-secrets.sh`) and volumes
//!   mapped to files here, the real binary on the `PATH`. Its settings load
//!   (`--print-config`) with one value per service checked, a misspelled key
//!   is refused by name, and the `admin-key` service really makes one admin
//!   API key (on SQLite) and keeps it on a second start;
//! * Prometheus' `compose.yml` passes `promtool` and scrapes the services on
//!   their ports; Grafana gets its provisioning and dashboards where they say.
//!
//! The `Dockerfile` is checked by `dockerfile.rs`.
//!
//! `check-jsonschema` (PyPI, pinned in `.ci/run`), `docker-compose` and
//! `promtool` (Debian) are installed by `.ci/run`; without them these tests
//! fail, naming the install command.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    compose, dockerfile, fleetpatch_services, interpolate, read, repo, scalar, services, strings, text, tool,
    tool_output,
};
use serde_norway::Value;

const WHAT: &str = "the compose tests";

fn check_jsonschema() -> PathBuf {
    tool("check-jsonschema", "python3 -m venv V && V/bin/pip install check-jsonschema==0.39.0", WHAT)
}

fn docker_compose() -> PathBuf {
    tool("docker-compose", "apt-get install -y --no-install-recommends docker-compose", WHAT)
}

fn succeeds(program: &Path, args: &[&str]) -> String {
    let output = tool_output(program, args);
    assert!(output.status.success(), "{} {args:?} failed: {}", program.display(), text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// The compose file.

/// A service's `environment` as written (map or `KEY=value` list).
fn environment(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Mapping(map) => map.iter().map(|(k, v)| (scalar(k), scalar(v))).collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|item| {
                let item = scalar(item);
                let (key, value) = item.split_once('=').expect("KEY=value");
                (key.to_owned(), value.to_owned())
            })
            .collect(),
        Value::Null => Vec::new(),
        other => panic!("environment: {other:?}"),
    }
}

#[test]
fn the_compose_file_follows_the_specification_and_docker_compose_reads_it() {
    let validated = succeeds(&check_jsonschema(), &["--builtin-schema", "vendor.compose-spec", "docker-compose.yml"]);
    assert!(validated.contains("ok"), "{validated}");
    let config = succeeds(&docker_compose(), &["-f", "docker-compose.yml", "config"]);
    let resolved: Value = serde_norway::from_str(&config).expect("docker-compose config prints YAML");
    let compose = compose();
    let names: BTreeSet<String> = services(&compose).into_iter().collect();
    assert_eq!(names, services(&resolved).into_iter().collect(), "docker-compose reads every service");
    assert_eq!(
        resolved["services"]["worker"]["environment"]["FLEETPATCH__WORKER__COLLECTOR_URL"].as_str(),
        Some("http://collector:1072"),
        "the default of ${{FLEETPATCH_COLLECTOR_URL}}"
    );

    // Both refuse a misspelled key: they check something.
    let mut broken = compose.clone();
    broken["services"]["worker"].as_mapping_mut().unwrap().insert("restrat".into(), "always".into());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("docker-compose.yml");
    std::fs::write(&file, serde_norway::to_string(&broken).unwrap()).unwrap();
    let file = file.to_str().unwrap();
    let refused = tool_output(&check_jsonschema(), &["--builtin-schema", "vendor.compose-spec", file]);
    assert!(!refused.status.success() && text(&refused).contains("restrat"), "{}", text(&refused));
    let project = repo().display().to_string();
    let refused = tool_output(&docker_compose(), &["-f", file, "--project-directory", &project, "config"]);
    assert!(!refused.status.success() && text(&refused).contains("restrat"), "{}", text(&refused));

    // What the issue asks of the services.
    let fleetpatch: BTreeSet<String> = fleetpatch_services(&compose).into_iter().collect();
    let expected = ["admin-key", "collector", "migrate", "scheduler", "worker"];
    assert_eq!(fleetpatch, expected.map(String::from).into(), "the services of the fleetpatch image");
    for expected in ["postgres", "rabbitmq", "prometheus", "grafana"] {
        assert!(names.contains(expected), "{expected} is a service");
    }
    let volumes = compose["volumes"].as_mapping().expect("named volumes");
    for store in ["postgres", "rabbitmq"] {
        let service = &compose["services"][store];
        assert!(!strings(&service["healthcheck"]["test"]).is_empty(), "{store} has a health check");
        let volume = strings(&service["volumes"]).into_iter().next().unwrap_or_else(|| panic!("{store} keeps data"));
        let name = volume.split(':').next().unwrap();
        assert!(volumes.contains_key(name), "{store}'s data is in the named volume {name}");
    }
    assert_eq!(strings(&compose["services"]["migrate"]["command"]), ["migrate"]);
    for name in fleetpatch.iter().filter(|name| *name != "migrate") {
        let depends = &compose["services"][name.as_str()]["depends_on"];
        assert_eq!(
            depends["migrate"]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{name} starts after the migrations"
        );
    }
    for name in ["scheduler", "collector", "worker"] {
        let depends = &compose["services"][name]["depends_on"];
        assert_eq!(depends["rabbitmq"]["condition"].as_str(), Some("service_healthy"), "{name} waits for the broker");
    }
    let worker = &compose["services"]["worker"];
    for fixed in ["container_name", "hostname", "ports"] {
        assert!(worker[fixed].is_null(), "`--scale worker=N` needs a worker without {fixed}");
    }
    assert_eq!(strings(&compose["services"]["collector"]["ports"]), ["1072:1072"], "agents report to :1072");
    assert_eq!(strings(&compose["services"]["scheduler"]["ports"]), ["8080:8080"], "the API on :8080");
}

// ---------------------------------------------------------------------------
// The services as their containers run them.

/// Temporary stand-ins for what a container has: the secrets directory
/// (`FLEETPATCH_SECRETS`), named volumes, and a `PATH` with the binary.
struct Fixture {
    _dir: tempfile::TempDir,
    secrets: PathBuf,
    volumes: PathBuf,
    bin: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (secrets, volumes, bin) = (dir.path().join("secrets"), dir.path().join("volumes"), dir.path().join("bin"));
        std::fs::create_dir_all(&volumes).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_fleetpatch"), bin.join("fleetpatch")).unwrap();
        Self { _dir: dir, secrets, volumes, bin }
    }

    fn vars(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([("FLEETPATCH_SECRETS", self.secrets.display().to_string())])
    }

    /// `deploy/compose/make-secrets.sh` into the secrets directory.
    fn make_secrets(&self) -> String {
        let output = Command::new("/bin/sh")
            .arg(repo().join("deploy/compose/make-secrets.sh"))
            .arg(&self.secrets)
            .output()
            .unwrap();
        assert!(output.status.success(), "make-secrets.sh: {}", text(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

/// A fleetpatch service of the compose file as its container runs it.
struct Container {
    service: String,
    /// Entry point and command, container paths replaced by their stand-ins.
    argv: Vec<String>,
    /// The image's ENV, then the service's environment (interpolated), mapped.
    env: Vec<(String, String)>,
    /// Container path → stand-in: the image's files, volumes, secrets.
    mounts: Vec<(String, PathBuf)>,
    bin: PathBuf,
}

impl Container {
    fn of(service: &str, fixture: &Fixture) -> Self {
        let compose = compose();
        let stages = dockerfile();
        let image = stages.last().unwrap();
        let spec = &compose["services"][service];
        let vars = fixture.vars();
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for copy in image.copies.iter().filter(|c| c.from.is_none()) {
            mounts.push((copy.dest.clone(), repo().join(&copy.sources[0])));
        }
        for volume in strings(&spec["volumes"]) {
            let mut parts = volume.split(':');
            let (source, target) = (parts.next().unwrap(), parts.next().expect("source:target"));
            let host = if source.starts_with('.') || source.starts_with('/') {
                repo().join(source)
            } else {
                assert!(compose["volumes"].as_mapping().unwrap().contains_key(source), "{service}: volume {source}");
                let dir = fixture.volumes.join(source);
                std::fs::create_dir_all(&dir).unwrap();
                dir
            };
            mounts.push((target.to_owned(), host));
        }
        for secret in spec["secrets"].as_sequence().map(Vec::as_slice).unwrap_or_default() {
            let (source, target) = match secret {
                Value::String(name) => (name.clone(), name.clone()),
                long => (
                    scalar(&long["source"]),
                    long["target"].as_str().map(str::to_owned).unwrap_or(scalar(&long["source"])),
                ),
            };
            let file = scalar(&compose["secrets"][source.as_str()]["file"]);
            let target = if target.starts_with('/') { target } else { format!("/run/secrets/{target}") };
            mounts.push((target, repo().join(interpolate(&file, &vars))));
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let map = |text: &str| {
            mounts
                .iter()
                .fold(text.to_owned(), |text, (path, host)| text.replace(path.as_str(), host.to_str().unwrap()))
        };

        let mut env: Vec<(String, String)> = image.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.extend(environment(spec).into_iter().map(|(k, v)| (k, interpolate(&v, &vars))));
        for (key, value) in &env {
            let path = value.strip_prefix("file:").unwrap_or(value);
            if path.starts_with('/') {
                assert!(
                    mounts.iter().any(|(mount, _)| path == mount || path.starts_with(&format!("{mount}/"))),
                    "{service}: {key}={value}: the container has no {path} (not in the image, a volume or a secret)"
                );
            }
        }
        let env = env.into_iter().map(|(k, v)| (k, map(&v))).collect();
        let entrypoint =
            if spec["entrypoint"].is_null() { image.entrypoint.clone() } else { strings(&spec["entrypoint"]) };
        let command = if spec["command"].is_null() { image.cmd.clone() } else { strings(&spec["command"]) };
        let argv: Vec<String> = entrypoint.iter().chain(&command).map(|a| map(&interpolate(a, &vars))).collect();
        assert!(Path::new(&argv[0]).is_file(), "{service}: the entry point {} is a file of the image", entrypoint[0]);
        Self { service: service.to_owned(), argv, env, mounts, bin: fixture.bin.clone() }
    }

    /// Runs the entry point with `args` instead of the command (all of it
    /// when `args` is `None`).
    fn run(&self, args: Option<&[&str]>) -> Output {
        let argv: Vec<&str> = match args {
            None => self.argv.iter().map(String::as_str).collect(),
            Some(args) => std::iter::once(self.argv[0].as_str()).chain(args.iter().copied()).collect(),
        };
        Command::new("/bin/sh")
            .args(&argv)
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", self.bin.display()))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap()
    }

    /// The command as written with `--print-config`; for a shell script,
    /// `fleetpatch --print-config` in the same environment.
    fn print_config(&self) -> Output {
        if self.argv[1] == "fleetpatch" {
            let args: Vec<&str> = self.argv[1..].iter().map(String::as_str).chain(["--print-config"]).collect();
            self.run(Some(&args))
        } else {
            assert_eq!(self.argv[1..3], ["/bin/sh", "-c"], "{}: fleetpatch or a shell script", self.service);
            self.run(Some(&["fleetpatch", "--print-config"]))
        }
    }

    fn mapped(&self, container_path: &str) -> PathBuf {
        let (mount, host) = self
            .mounts
            .iter()
            .find(|(mount, _)| container_path.starts_with(mount.as_str()))
            .unwrap_or_else(|| panic!("{}: nothing at {container_path}", self.service));
        PathBuf::from(format!("{}{}", host.display(), &container_path[mount.len()..]))
    }
}

fn value_at<'a>(config: &'a toml::Value, key: &str) -> Option<&'a toml::Value> {
    key.split('.').try_fold(config, |value, part| value.get(part))
}

#[test]
fn each_fleetpatch_service_loads_its_environment_and_command_with_the_real_binary() {
    let fixture = Fixture::new();
    assert!(fixture.make_secrets().contains("made"));
    // make-secrets.sh: every secret the compose file reads, consistent, private, made once.
    let compose = compose();
    let secret = |name: &str| std::fs::read_to_string(fixture.secrets.join(name)).unwrap().trim_end().to_owned();
    let before: Vec<(String, String)> = compose["secrets"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(name, spec)| {
            let file = repo().join(interpolate(&scalar(&spec["file"]), &fixture.vars()));
            assert!(file.starts_with(&fixture.secrets), "{name:?} comes from FLEETPATCH_SECRETS");
            let mode =
                std::fs::metadata(&file).unwrap_or_else(|_| panic!("make-secrets.sh makes {file:?}")).permissions();
            assert_eq!(mode.mode() & 0o777, 0o644, "{file:?}: readable by the container's user, written by nobody");
            (scalar(name), std::fs::read_to_string(&file).unwrap())
        })
        .collect();
    assert_eq!(std::fs::metadata(&fixture.secrets).unwrap().permissions().mode() & 0o777, 0o700);
    assert!(!fixture.make_secrets().contains("made"), "a second run makes nothing");
    for (name, content) in &before {
        let file = compose["secrets"][name.as_str()]["file"].clone();
        let file = repo().join(interpolate(&scalar(&file), &fixture.vars()));
        assert_eq!(&std::fs::read_to_string(file).unwrap(), content, "{name} is kept");
    }
    let postgres = environment(&compose["services"]["postgres"]).into_iter().collect::<BTreeMap<_, _>>();
    assert_eq!(
        secret("database-url"),
        format!(
            "postgres://{}:{}@postgres:5432/{}",
            postgres["POSTGRES_USER"],
            secret("postgres-password"),
            postgres["POSTGRES_DB"]
        )
    );
    let rabbitmq = secret("rabbitmq.conf");
    let setting = |key: &str| {
        rabbitmq
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key}"))
            .to_owned()
    };
    assert_eq!(
        secret("amqp-url"),
        format!("amqp://{}:{}@rabbitmq:5672/%2f", setting("default_user"), setting("default_pass"))
    );
    assert!(secret("token-key").len() >= 32 && secret("postgres-password").len() >= 32);

    let database = "postgres://fleetpatch:***@postgres:5432/fleetpatch";
    let amqp = "amqp://fleetpatch:***@rabbitmq:5672/%2f";
    let expected: [(&str, &[(&str, &str)]); 5] = [
        ("migrate", &[("database.url", database)]),
        ("admin-key", &[("database.url", database)]),
        (
            "scheduler",
            &[
                ("database.url", database),
                ("amqp.url", amqp),
                ("scheduler.listen", "0.0.0.0:8080"),
                ("client.api_url", "http://127.0.0.1:8080"),
            ],
        ),
        ("collector", &[("database.url", database), ("amqp.url", amqp), ("collector.listen", "0.0.0.0:1072")]),
        (
            "worker",
            &[
                ("database.url", database),
                ("amqp.url", amqp),
                ("worker.collector_url", "http://collector:1072"),
                (
                    "worker.agent_binaries.windows-x86_64",
                    "/usr/local/lib/fleetpatch/agents/fleetpatch-agent-windows-x86_64.exe",
                ),
            ],
        ),
    ];
    assert_eq!(
        expected.iter().map(|(name, _)| name.to_string()).collect::<BTreeSet<_>>(),
        fleetpatch_services(&compose).into_iter().collect(),
        "every fleetpatch service is checked"
    );
    for (service, values) in expected {
        let container = Container::of(service, &fixture);
        let loaded = container.print_config();
        assert!(loaded.status.success(), "{service}: its settings do not load: {}", text(&loaded));
        let printed: toml::Value = toml::from_str(&String::from_utf8_lossy(&loaded.stdout)).unwrap();
        for (key, value) in values {
            assert_eq!(value_at(&printed, key).and_then(|v| v.as_str()), Some(*value), "{service}: {key}");
        }
        // Workers and collector read the token key from their secret.
        if ["worker", "collector"].contains(&service) {
            let key_ref = value_at(&printed, "tokens.key_ref").and_then(|v| v.as_str()).expect("tokens.key_ref");
            let key = std::fs::read_to_string(key_ref.strip_prefix("file:").expect("a file: reference")).unwrap();
            assert_eq!(key.trim_end(), secret("token-key"), "{service}: tokens.key_ref");
        }
    }
    // The admin-key service runs `fleetpatch apikey create` (see the next tests).
    assert!(Container::of("admin-key", &fixture).argv[3].contains("fleetpatch apikey create"));
}

#[test]
fn a_misspelled_key_in_a_services_environment_is_refused_by_name() {
    let fixture = Fixture::new();
    fixture.make_secrets();
    let mut refused = 0;
    for service in fleetpatch_services(&compose()) {
        let container = Container::of(&service, &fixture);
        for (index, (key, _)) in container.env.iter().enumerate() {
            if !(key.starts_with("FLEETPATCH__") || key.starts_with("FLEETPATCH_FILE__")) {
                continue;
            }
            let mut wrong = Container::of(&service, &fixture);
            wrong.env[index].0 = format!("{key}S");
            let loaded = wrong.print_config();
            let field = format!("{}s", key.rsplit("__").next().unwrap().to_lowercase());
            assert!(
                !loaded.status.success() && String::from_utf8_lossy(&loaded.stderr).contains(&field),
                "{service}: {key}S must be refused, naming {field}: {}",
                text(&loaded)
            );
            refused += 1;
        }
    }
    assert!(refused >= 10, "the services' keys were tried: {refused}");
}

#[test]
fn the_admin_key_service_makes_one_admin_key_and_keeps_it() {
    // The services' own commands, on SQLite instead of PostgreSQL.
    let fixture = Fixture::new();
    std::fs::create_dir_all(&fixture.secrets).unwrap();
    let database = format!("sqlite://{}?mode=rwc", fixture.secrets.join("fleetpatch.db").display());
    std::fs::write(fixture.secrets.join("database-url"), format!("{database}\n")).unwrap();
    let migrated = Container::of("migrate", &fixture).run(None);
    assert!(migrated.status.success(), "migrate: {}", text(&migrated));

    let admin = Container::of("admin-key", &fixture);
    let key_file = admin.mapped("/var/lib/fleetpatch/admin/admin.key");
    let first = admin.run(None);
    let said = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(first.status.success(), "admin-key: {}", text(&first));
    assert!(said.contains("made the first admin API key") && said.contains(key_file.to_str().unwrap()), "{said}");
    assert!(said.contains("docker compose exec scheduler"), "it says how to read it: {said}");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert!(key.starts_with("fpk_") && key.ends_with('\n') && key.lines().count() == 1, "{key:?}");
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);

    let second = admin.run(None);
    let said = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(second.status.success() && said.contains(key_file.to_str().unwrap()), "{}", text(&second));
    assert!(!said.contains("made the first"), "a second start keeps the key: {said}");
    assert_eq!(std::fs::read_to_string(&key_file).unwrap(), key);

    let listed = admin.run(Some(&["fleetpatch", "apikey", "list", "--output", "json"]));
    assert!(listed.status.success(), "{}", text(&listed));
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1, "{listed}");
    assert_eq!(keys[0]["role"], "admin");
    assert!(keys[0]["name"].as_str().unwrap().starts_with("compose-admin-"), "{listed}");

    // The scheduler's client (`docker compose exec scheduler fleetpatch ...`)
    // reads that file.
    let scheduler = Container::of("scheduler", &fixture);
    let token = scheduler.env.iter().find(|(k, _)| k == "FLEETPATCH__CLIENT__TOKEN").expect("client.token");
    assert_eq!(token.1, format!("file:{}", key_file.display()));
}

#[test]
fn prometheus_and_grafana_get_the_files_of_deploy_and_scrape_the_services() {
    let promtool = tool("promtool", "apt-get install -y --no-install-recommends prometheus", WHAT);
    let compose = compose();
    let prometheus = &compose["services"]["prometheus"];
    let config = strings(&prometheus["command"])
        .into_iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(str::to_owned))
        .expect("--config.file");
    let mounted = strings(&prometheus["volumes"])
        .into_iter()
        .find_map(|v| {
            let (source, rest) = v.split_once(':')?;
            let target = rest.split(':').next()?;
            config.strip_prefix(&format!("{target}/")).map(|file| format!("{}/{file}", source.trim_start_matches("./")))
        })
        .expect("the configuration is in a mounted directory");
    assert_eq!(mounted, "deploy/prometheus/compose.yml");
    succeeds(&promtool, &["check", "config", &mounted]);

    let scrape: Value = serde_norway::from_str(&read(&mounted)).unwrap();
    let job = &scrape["scrape_configs"][0];
    let listen = |service: &str, key: &str| {
        let env: BTreeMap<String, String> = environment(&compose["services"][service]).into_iter().collect();
        let listen = env.get(key).cloned().unwrap_or_else(|| panic!("{service} sets {key}"));
        format!("{service}:{}", listen.rsplit(':').next().unwrap())
    };
    let targets: BTreeSet<String> =
        job["static_configs"].as_sequence().unwrap().iter().flat_map(|c| strings(&c["targets"])).collect();
    assert_eq!(
        targets,
        BTreeSet::from([
            listen("scheduler", "FLEETPATCH__SCHEDULER__LISTEN"),
            listen("collector", "FLEETPATCH__COLLECTOR__LISTEN")
        ])
    );
    let workers = &job["dns_sd_configs"][0];
    assert_eq!(strings(&workers["names"]), ["worker"], "every worker replica, by the service's name");
    let worker_port = fleetpatch_worker::WorkerOptions::default().listen.rsplit(':').next().unwrap().to_owned();
    assert_eq!(scalar(&workers["port"]), worker_port, "the workers' ops port");
    assert!(environment(&compose["services"]["worker"]).iter().all(|(k, _)| k != "FLEETPATCH__WORKER__LISTEN"));

    let grafana = &compose["services"]["grafana"];
    let volumes: BTreeMap<String, String> = strings(&grafana["volumes"])
        .into_iter()
        .map(|v| {
            let mut parts = v.split(':');
            (parts.next().unwrap().trim_start_matches("./").to_owned(), parts.next().unwrap().to_owned())
        })
        .collect();
    assert_eq!(volumes["deploy/grafana/provisioning"], "/etc/grafana/provisioning");
    let provider: Value =
        serde_norway::from_str(&read("deploy/grafana/provisioning/dashboards/fleetpatch.yml")).unwrap();
    assert_eq!(
        Some(volumes["deploy/grafana/dashboards"].as_str()),
        provider["providers"][0]["options"]["path"].as_str()
    );
    let source: Value =
        serde_norway::from_str(&read("deploy/grafana/provisioning/datasources/prometheus.yml")).unwrap();
    assert_eq!(source["datasources"][0]["url"].as_str(), Some("http://prometheus:9090"), "the prometheus service");
}
