//! The web console, end to end: the real scheduler, the simulated fleet,
//! PostgreSQL and RabbitMQ of a [`Sandbox`], driven by HTTP (the session,
//! CSRF and role rules, escaping, headers) and by Debian's headless
//! Chromium through Playwright (`tests/console/console.mjs`: log in, create
//! a rollout from YAML, watch it live, pause, resume, a target, a viewer).
//!
//! The browser test needs `node`, `chromium` and `playwright-core`; `.ci/run`
//! installs them. A missing one fails the test, naming it: it never skips.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use fleetpatch_proto::state::{RolloutState, TargetState};
use fleetpatch_store::{AuditQuery, Role};
use fleetpatch_tests::{behaviour, sim_rollout, Sandbox, SandboxOptions};
use fleetpatch_transport::sim::SimOptions;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_SECURITY_POLICY, COOKIE, LOCATION, SET_COOKIE};
use reqwest::StatusCode;
use uuid::Uuid;

const SESSION_COOKIE: &str = fleetpatch_scheduler::console::SESSION_COOKIE;
const SCRIPT_HOST: &str = "xss-<script>window.__pwned=1</script>";

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_path_buf()
}

/// A client that sends the session cookie of `credential` and follows no redirect.
fn browser_like(credential: Option<&str>) -> reqwest::Client {
    let mut headers = HeaderMap::new();
    if let Some(credential) = credential {
        headers.insert(COOKIE, HeaderValue::from_str(&format!("{SESSION_COOKIE}={credential}")).expect("a cookie"));
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client")
}

async fn post_form(client: &reqwest::Client, url: String, fields: &[(&str, &str)]) -> (StatusCode, String) {
    let body: String =
        fields.iter().map(|(key, value)| format!("{key}={}", encode(value))).collect::<Vec<_>>().join("&");
    let response = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("POST");
    let status = response.status();
    (status, response.text().await.unwrap_or_default())
}

fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// The rollout request of `sim_rollout` with one more host named `SCRIPT_HOST`.
fn rollout_with_script_host(name: &str, targets: usize, concurrency: u32) -> serde_json::Value {
    let mut request = sim_rollout(name, targets, 1, concurrency, 30);
    request["targets"].as_array_mut().expect("targets").push(serde_json::json!({
        "host": SCRIPT_HOST,
        "transport": "sim",
        "labels": { "note": "<b>bold</b>" },
    }));
    request
}

/// The pages need a session, the POSTs a CSRF token and the role, target
/// words are escaped, and the API is as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_needs_a_session_checks_csrf_and_roles_and_escapes_what_targets_say() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let viewer_key = sandbox.api_key("console-viewer", Role::Viewer, None).await;
    let operator_key = sandbox.api_key("console-operator", Role::Operator, None).await;
    let id = sandbox.create_rollout(rollout_with_script_host("escaping", 3, 1)).await;
    let base = &sandbox.api;

    // No session: pages go to the login page, fragments answer 401, POSTs change nothing.
    let anonymous = browser_like(None);
    for path in ["/".to_owned(), format!("/rollouts/{id}"), "/rollouts/new".to_owned(), format!("/targets/{id}")] {
        let response = anonymous.get(format!("{base}{path}")).send().await.expect("GET");
        assert_eq!(response.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(response.headers()[LOCATION], "/login", "{path}");
    }
    let live = anonymous.get(format!("{base}/rollouts/{id}/live")).send().await.expect("GET live");
    assert_eq!(live.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = post_form(&anonymous, format!("{base}/rollouts/{id}/pause"), &[]).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "an anonymous POST is sent to the login page");
    let login = anonymous.get(format!("{base}/login")).send().await.expect("GET /login");
    assert_eq!(login.status(), StatusCode::OK);
    let csp = login.headers()[CONTENT_SECURITY_POLICY].to_str().expect("ascii").to_owned();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    assert_eq!(login.headers()["x-frame-options"], "DENY");
    let page = login.text().await.expect("the login page");
    assert!(!page.contains("<script>") && !page.contains(" style="), "no inline script or style: {page}");

    // Login: a bad key is refused on the page, a good one sets the cookie.
    let (status, page) = post_form(&anonymous, format!("{base}/login"), &[("credential", "fpk_nope")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(page.contains("not a fleetpatch API key"), "{page}");
    let response = anonymous
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("credential={}", encode(&operator_key)))
        .send()
        .await
        .expect("POST /login");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()[SET_COOKIE].to_str().expect("ascii").to_owned();
    assert_eq!(cookie, format!("{SESSION_COOKIE}={operator_key}; HttpOnly; SameSite=Strict; Path=/"));
    let behind_https = anonymous
        .post(format!("{base}/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-proto", "https")
        .body(format!("credential={}", encode(&operator_key)))
        .send()
        .await
        .expect("POST /login");
    assert!(behind_https.headers()[SET_COOKIE].to_str().expect("ascii").ends_with("; Secure"));
    let (status, _) =
        post_form(&browser_like(Some(&operator_key)), format!("{base}/login"), &[("credential", &operator_key)]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);

    // Escaping: what a target says is text.
    let operator = browser_like(Some(&operator_key));
    let page = operator.get(format!("{base}/rollouts/{id}")).send().await.expect("GET").text().await.expect("page");
    assert!(page.contains("xss-&lt;script&gt;window.__pwned=1&lt;/script&gt;"), "the host name is escaped");
    assert!(page.contains("note=&lt;b&gt;bold&lt;/b&gt;"), "labels are escaped");
    assert!(!page.contains("<script>window"), "no target word becomes markup");
    assert!(page.contains("action-pause"), "an operator sees the buttons");
    let rows = |page: &str| page.matches("href=\"/targets/").count();
    assert_eq!(rows(&page), 4, "every target");
    for (query, expected) in [
        ("label=note%3D%3Cb%3Ebold%3C%2Fb%3E", 1),
        ("label=note%3Dplain", 0),
        ("host=HOST-0000", 3),
        ("wave=0", 4),
        ("wave=1", 0),
        ("state=succeeded", 0),
        ("after=1", 2),
    ] {
        let page = operator.get(format!("{base}/rollouts/{id}?{query}")).send().await.expect("GET");
        assert_eq!(page.status(), StatusCode::OK, "{query}");
        assert_eq!(rows(&page.text().await.expect("page")), expected, "{query}");
    }
    let bad = operator.get(format!("{base}/rollouts/{id}?label=nonsense")).send().await.expect("GET");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST, "a label filter must be key=value");

    // CSRF: none, another session's, then the right one.
    let csrf = fleetpatch_scheduler::console::csrf_token(&operator_key);
    let pause = format!("{base}/rollouts/{id}/pause");
    let (status, page) = post_form(&operator, pause.clone(), &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("CSRF"), "{page}");
    let viewer_csrf = fleetpatch_scheduler::console::csrf_token(&viewer_key);
    let (status, _) = post_form(&operator, pause.clone(), &[("csrf", &viewer_csrf)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "another session's token");
    let foreign = operator
        .post(pause.clone())
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "https://evil.example")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .expect("POST");
    assert_eq!(foreign.status(), StatusCode::FORBIDDEN, "a foreign Origin");
    assert_eq!(sandbox.store.rollout(id).await.expect("rollout").state, RolloutState::Running, "nothing changed");
    let (status, _) = post_form(&operator, pause.clone(), &[("csrf", &csrf)]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(sandbox.store.rollout(id).await.expect("rollout").state, RolloutState::Paused);

    // A viewer: no buttons, and a forged POST with its own valid token is 403.
    let viewer = browser_like(Some(&viewer_key));
    let page = viewer.get(format!("{base}/rollouts/{id}")).send().await.expect("GET").text().await.expect("page");
    assert!(!page.contains("<button type=\"submit\" class=\"action"), "a viewer sees no action button");
    assert!(!page.contains("/rollouts/new"), "a viewer is offered no new rollout");
    assert!(page.contains(&viewer_csrf), "the viewer's page carries its token (the logout form)");
    for action in ["resume", "abort", "retry-failed", "approve", "pause"] {
        let (status, page) =
            post_form(&viewer, format!("{base}/rollouts/{id}/{action}"), &[("csrf", &viewer_csrf)]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{action}: {page}");
        assert!(page.contains("operator role"), "{page}");
    }
    let (status, _) =
        post_form(&viewer, format!("{base}/rollouts/new"), &[("csrf", &viewer_csrf), ("yaml", "name: x")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(viewer.get(format!("{base}/rollouts/new")).send().await.expect("GET").status(), StatusCode::FORBIDDEN);
    assert_eq!(
        sandbox.store.rollout(id).await.expect("rollout").state,
        RolloutState::Paused,
        "the viewer changed nothing"
    );

    // Audited like the API: the operator's pause, the viewer's refusals.
    let audit = sandbox
        .store
        .audit_entries(AuditQuery { rollout_id: Some(id), before: None, limit: 100 })
        .await
        .expect("audit");
    assert!(audit
        .iter()
        .any(|e| e.actor == "console-operator" && e.route == "/rollouts/{id}/pause" && e.status == 303));
    assert_eq!(audit.iter().filter(|e| e.actor == "console-viewer" && e.status == 403).count(), 5);

    // The operator's other buttons take the API's path: resume, abort; an
    // aborted rollout cannot be retried, and the page says why.
    let fields = [("csrf", csrf.as_str())];
    let act = |action: &str| post_form(&operator, format!("{base}/rollouts/{id}/{action}"), &fields);
    assert_eq!(act("resume").await.0, StatusCode::SEE_OTHER);
    assert_eq!(sandbox.store.rollout(id).await.expect("rollout").state, RolloutState::Running);
    assert_eq!(act("abort").await.0, StatusCode::SEE_OTHER);
    assert_eq!(sandbox.store.rollout(id).await.expect("rollout").state, RolloutState::Aborted);
    let (status, page) = act("retry-failed").await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    assert!(page.contains("aborted"), "the refusal names the state: {page}");
    let (status, page) = act("approve").await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    let (status, _) = act("reboot").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an unknown action is refused by name");

    // Create: a YAML mistake names its line and field, as the CLI does.
    let (status, page) = post_form(
        &operator,
        format!("{base}/rollouts/new"),
        &[
            ("csrf", &csrf),
            ("yaml", "name: broken\r\nconcurrency: 5\r\ntargets:\r\n  - host: a\r\n    port: many\r\npatches: []\r\n"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(page.contains("<span id=\"error-line\">5</span>"), "{page}");
    assert!(page.contains("<code id=\"error-field\">targets[0].port</code>"), "{page}");

    // Logout clears the cookie; the API is unchanged (a bearer, never the cookie).
    let (status, _) = post_form(&operator, format!("{base}/logout"), &[("csrf", &csrf)]).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let api = operator.get(format!("{base}/v1/rollouts")).send().await.expect("GET /v1/rollouts");
    assert_eq!(api.status(), StatusCode::UNAUTHORIZED, "the API takes no session cookie");
    sandbox.stop().await;
}

/// The targets table pages a rollout of 100,000 targets in SQL (keyset on
/// the ordinal): the first and last pages and searches give the right 50
/// rows and the right next link. Their times are printed, not asserted
/// (speed is measured in benchmarks, never in tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_targets_table_pages_a_rollout_of_a_hundred_thousand_targets() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let id = sandbox.create_rollout(sim_rollout("large", 100_000, 1, 1, 60)).await;
    let viewer = browser_like(Some(&sandbox.api_key("large-viewer", Role::Viewer, None).await));
    let base = &sandbox.api;
    for (query, first, last, next) in [
        ("", "host-00000", "host-00049", Some("after=49")),
        ("after=99949", "host-99950", "host-99999", None),
        ("host=host-5000", "host-50000", "host-50009", None),
        ("host=9999&after=49999", "host-59999", "host-99999", None),
    ] {
        let started = std::time::Instant::now();
        let response = viewer.get(format!("{base}/rollouts/{id}?{query}")).send().await.expect("GET");
        assert_eq!(response.status(), StatusCode::OK, "{query}");
        let page = response.text().await.expect("page");
        let took = started.elapsed();
        println!("{query:?}: {took:?}");
        let hosts: Vec<&str> = page
            .split("href=\"/targets/")
            .skip(1)
            .filter_map(|link| link.split_once("\">").and_then(|(_, rest)| rest.split_once('<')).map(|(host, _)| host))
            .collect();
        assert_eq!((hosts.first().copied(), hosts.last().copied()), (Some(first), Some(last)), "{query}");
        assert!(hosts.len() <= 50, "{query}: a page holds at most 50 targets");
        let next_link = page.split("class=\"next\" href=\"").nth(1).and_then(|rest| rest.split('"').next());
        assert_eq!(next_link.map(|link| link.rsplit('?').next().unwrap_or_default()), next, "{query}");
    }
    sandbox.stop().await;
}

/// A tool the browser test needs: from its variable, else a default path or `PATH`.
fn required(variable: &str, name: &str, default: Option<&str>, install: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(variable) {
        let path = PathBuf::from(path);
        assert!(path.exists(), "{variable}={} does not exist: {install} (.ci/run does this)", path.display());
        return path;
    }
    if let Some(default) = default.map(PathBuf::from).filter(|path| path.exists()) {
        return default;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is required by the console's browser test and was not found (set {variable}): {install} (.ci/run does this)")
        })
}

/// Debian's headless Chromium, driven by Playwright: the whole console as
/// an operator and a viewer use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let node = required("FLEETPATCH_NODE", "node", None, "apt-get install nodejs");
    let chromium = required("FLEETPATCH_CHROMIUM", "chromium", Some("/usr/bin/chromium"), "apt-get install chromium");
    let playwright = std::env::var_os("FLEETPATCH_PLAYWRIGHT_DIR").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "FLEETPATCH_PLAYWRIGHT_DIR must name the node_modules that hold playwright-core: \
             npm ci in a copy of tests/console (.ci/run does this)"
        )
    });
    assert!(
        playwright.join("playwright-core").join("package.json").is_file(),
        "FLEETPATCH_PLAYWRIGHT_DIR={} holds no playwright-core: npm ci in a copy of tests/console (.ci/run does this)",
        playwright.display()
    );
    let screenshots = std::env::var_os("FLEETPATCH_CONSOLE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target").join("console-screenshots"));

    // Slow enough patches that the rollout is still running when the browser acts.
    let sim = SimOptions { min_latency_ms: 1, max_latency_ms: 5, patch_ms: 500, ..SimOptions::default() };
    let sandbox = Sandbox::start(SandboxOptions { sim, ..SandboxOptions::default() }).await;
    let viewer_key = sandbox.api_key("console-viewer", Role::Viewer, None).await;
    let admin_key = sandbox.api_key("console-admin", Role::Admin, None).await;
    let mut request = rollout_with_script_host("console-browser", 60, 3);
    // Two of the first hosts fail their patch: failures by reason, retry failed.
    for index in [1, 2] {
        request["targets"][index]["labels"] = serde_json::json!(behaviour("fail_patch"));
    }
    let yaml = serde_json::to_string_pretty(&request).expect("JSON is YAML");

    let script = workspace().join("tests").join("console").join("console.mjs");
    let base = sandbox.api.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(node)
            .arg(script)
            .env("FP_URL", base)
            .env("FP_ADMIN_KEY", admin_key)
            .env("FP_VIEWER_KEY", viewer_key)
            .env("FP_ROLLOUT_YAML", yaml)
            .env("FP_SCREENSHOTS", &screenshots)
            .env("FLEETPATCH_PLAYWRIGHT_DIR", playwright)
            .env("FLEETPATCH_CHROMIUM", chromium)
            .output()
            .expect("run node")
    })
    .await
    .expect("the browser test");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    println!("{stdout}");
    assert!(output.status.success(), "the browser test failed ({:?}):\n{stdout}\n{stderr}", output.status);
    let checks = stdout.lines().filter(|line| line.starts_with("ok: ")).count();
    assert!(checks >= 30, "the browser test made only {checks} checks:\n{stdout}");

    // What the browser did, as the scheduler recorded it.
    let id: Uuid = stdout
        .lines()
        .find_map(|line| line.strip_prefix("ROLLOUT "))
        .expect("the script names its rollout")
        .parse()
        .expect("a rollout id");
    let rollout = sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(10)).await;
    assert_eq!(rollout.name, "console-browser");
    let targets = sandbox.all_targets(id).await;
    assert_eq!(targets.len(), 61);
    assert!(targets.iter().any(|t| t.host == SCRIPT_HOST));
    let failed: Vec<&str> =
        targets.iter().filter(|t| t.state == TargetState::Failed).map(|t| t.host.as_str()).collect();
    assert_eq!(failed, ["host-00001", "host-00002"]);
    let audit = sandbox
        .store
        .audit_entries(AuditQuery { rollout_id: Some(id), before: None, limit: 100 })
        .await
        .expect("audit");
    for (actor, route, status) in [
        ("console-admin", "/rollouts/new", 303),
        ("console-admin", "/rollouts/{id}/pause", 303),
        ("console-admin", "/rollouts/{id}/resume", 303),
        ("console-viewer", "/rollouts/{id}/retry-failed", 403),
    ] {
        assert!(
            audit.iter().any(|e| e.actor == actor && e.route == route && e.status == status),
            "audit has no {actor} {route} {status}: {audit:?}"
        );
    }
    for name in ["login", "rollouts", "rollout", "target", "create"] {
        let file = PathBuf::from(
            std::env::var_os("FLEETPATCH_CONSOLE_SCREENSHOTS")
                .unwrap_or_else(|| workspace().join("target").join("console-screenshots").into_os_string()),
        )
        .join(format!("{name}.png"));
        assert!(file.metadata().is_ok_and(|m| m.len() > 1_000), "screenshot {} was not saved", file.display());
    }
    sandbox.stop().await;
}
