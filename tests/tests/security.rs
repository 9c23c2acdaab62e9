//! The API's authentication, roles and audit log, from outside: what a
//! caller without a credential, with a weak one, or with a forged one gets.
//!
//! The route list comes from the running scheduler's `/openapi.json`, so a
//! route added to the document cannot escape these checks; the OpenAPI
//! unit test in the scheduler makes sure every route is in the document.

use std::time::Duration;

use base64::Engine;
use fleetpatch_scheduler::auth::{AuthOptions, OidcOptions, RoleValues};
use fleetpatch_store::Role;
use fleetpatch_tests::{client_with, sim_rollout, Sandbox, SandboxOptions};
use reqwest::{Method, StatusCode};
use uuid::Uuid;

/// Every (method, concrete path, route template) of the OpenAPI document.
async fn documented_routes(sandbox: &Sandbox) -> Vec<(Method, String, String)> {
    // The document itself is open: it describes the API and holds no data.
    let response =
        client_with(None).get(format!("{}/openapi.json", sandbox.api)).send().await.expect("GET /openapi.json");
    assert_eq!(response.status(), StatusCode::OK, "/openapi.json is readable without a credential");
    let document: serde_json::Value = response.json().await.expect("the OpenAPI document is JSON");
    let mut routes = Vec::new();
    for (template, operations) in document["paths"].as_object().expect("paths") {
        let path = template.replace("{id}", &Uuid::new_v4().to_string()).replace("{sha256}", &"a".repeat(64));
        for method in operations.as_object().expect("operations").keys() {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("an HTTP method");
            routes.push((method, path.clone(), template.clone()));
        }
    }
    routes
}

fn is_mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

async fn call(client: &reqwest::Client, sandbox: &Sandbox, method: &Method, path: &str) -> reqwest::Response {
    client
        .request(method.clone(), format!("{}{path}", sandbox.api))
        .send()
        .await
        .unwrap_or_else(|error| panic!("{method} {path}: {error}"))
}

fn assert_problem(response: &reqwest::Response, status: StatusCode, what: &str) {
    assert_eq!(response.status(), status, "{what}");
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert_eq!(content_type, "application/problem+json", "{what}");
}

async fn detail(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.expect("a problem+json body");
    body["detail"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_needs_a_credential_and_a_viewer_changes_nothing() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let routes = documented_routes(&sandbox).await;
    assert!(routes.len() >= 12, "the document lists the API's routes: {routes:?}");
    let anonymous = client_with(None);
    for (method, path, template) in &routes {
        let response = call(&anonymous, &sandbox, method, path).await;
        let what = format!("{method} {template} without a credential");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        let challenge = response.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(challenge.starts_with("Bearer"), "{what}: WWW-Authenticate {challenge:?}");
        if *method != Method::HEAD {
            assert_problem(&response, StatusCode::UNAUTHORIZED, &what);
            assert!(detail(response).await.contains("fleetpatch apikey create"), "{what}: the answer says what to do");
        }
    }
    // A malformed or unknown credential is no better than none.
    for bad in ["Bearer hunter2", "Bearer fpk_short", "Basic YWRtaW46YWRtaW4=", "Bearer eyJhbGciOiJFZERTQSJ9.e30.c2ln"]
    {
        let response = reqwest::Client::new()
            .get(format!("{}/v1/rollouts", sandbox.api))
            .header("authorization", bad)
            .send()
            .await
            .expect("GET");
        assert_problem(&response, StatusCode::UNAUTHORIZED, bad);
    }
    let unknown = format!("fpk_{}_{}", "0".repeat(16), "0".repeat(64));
    let response = call(&client_with(Some(&unknown)), &sandbox, &Method::GET, "/v1/rollouts").await;
    assert_problem(&response, StatusCode::UNAUTHORIZED, "an unknown key");

    // A viewer reads, and is refused every change and the audit log.
    let viewer = client_with(Some(&sandbox.api_key("dashboard", Role::Viewer, None).await));
    let mut refused = 0;
    for (method, path, template) in &routes {
        let response = call(&viewer, &sandbox, method, path).await;
        let what = format!("{method} {template} as a viewer");
        if is_mutating(method) || template == "/v1/audit" {
            assert_problem(&response, StatusCode::FORBIDDEN, &what);
            let detail = detail(response).await;
            assert!(detail.contains("needs the") && detail.contains("\"dashboard\" has viewer"), "{what}: {detail}");
            refused += 1;
        } else {
            assert_ne!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
            assert_ne!(response.status(), StatusCode::FORBIDDEN, "{what}");
        }
    }
    assert!(refused >= 7, "create, pause, resume, abort, retry-failed, upload and the audit log are refused");
    assert_eq!(call(&viewer, &sandbox, &Method::GET, "/v1/rollouts").await.status(), StatusCode::OK);

    // Anonymous refusals are counted, never stored; the viewer's refusals are audited.
    let entries = sandbox
        .store
        .audit_entries(fleetpatch_store::AuditQuery { limit: 1_000, ..Default::default() })
        .await
        .expect("audit");
    assert!(!entries.is_empty());
    assert!(entries.iter().all(|e| e.actor == "dashboard" && e.status == 403), "{entries:#?}");
    let metrics = client_with(None).get(format!("{}/metrics", sandbox.api)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fleetpatch_api_auth_failures_total{reason=\"missing\"}"), "{metrics}");
    assert!(metrics.contains("fleetpatch_api_auth_failures_total{reason=\"malformed\"}"), "{metrics}");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_keys_are_refused() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let expiring = sandbox
        .api_key("short-lived", Role::Operator, Some(chrono::Utc::now() + chrono::Duration::milliseconds(1500)))
        .await;
    let leaked = sandbox.api_key("leaked", Role::Admin, None).await;
    for key in [&expiring, &leaked] {
        let response = call(&client_with(Some(key)), &sandbox, &Method::GET, "/v1/rollouts").await;
        assert_eq!(response.status(), StatusCode::OK, "the key works before");
    }
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    sandbox.store.revoke_api_key("leaked").await.expect("revoke");
    for (key, word) in [(&expiring, "expired"), (&leaked, "revoked")] {
        let response = call(&client_with(Some(key)), &sandbox, &Method::GET, "/v1/rollouts").await;
        assert_problem(&response, StatusCode::UNAUTHORIZED, word);
        let detail = detail(response).await;
        assert!(detail.contains(word), "{word}: {detail}");
    }
    sandbox.stop().await;
}

// ---------------------------------------------------------------- OIDC

const ISSUER: &str = "https://idp.fleetpatch.test/realms/ops";
const AUDIENCE: &str = "fleetpatch-api";
const KID: &str = "test-key-1";

/// An Ed25519 key pair made for this test: the PKCS#8 document
/// jsonwebtoken signs with, and the public key for the JWKS.
struct TestKey {
    pkcs8: Vec<u8>,
    public: [u8; 32],
}

impl TestKey {
    fn generate() -> Self {
        let mut seed = [0u8; 32];
        seed[..16].copy_from_slice(Uuid::new_v4().as_bytes());
        seed[16..].copy_from_slice(Uuid::new_v4().as_bytes());
        let public = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        // RFC 8410: PrivateKeyInfo { v1, id-Ed25519, OCTET STRING { OCTET STRING seed } }.
        let mut pkcs8 =
            vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
        pkcs8.extend_from_slice(&seed);
        Self { pkcs8, public }
    }

    fn jwk(&self, kid: &str) -> serde_json::Value {
        serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.public),
        })
    }

    fn sign(&self, kid: &str, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_ed_der(&self.pkcs8)).expect("sign")
    }
}

/// Authentication by the test IdP's tokens only: its key in a JWKS file in
/// `dir`, groups `fleet-readers|deployers|admins` for the three roles.
fn oidc_auth(idp: &TestKey, dir: &std::path::Path) -> AuthOptions {
    let jwks_file = dir.join("jwks.json");
    std::fs::write(&jwks_file, serde_json::json!({ "keys": [idp.jwk(KID)] }).to_string()).unwrap();
    AuthOptions {
        oidc: Some(OidcOptions {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            jwks_file: Some(jwks_file),
            jwks_url: None,
            role_claim: "groups".into(),
            roles: RoleValues {
                viewer: vec!["fleet-readers".into()],
                operator: vec!["fleet-deployers".into()],
                admin: vec!["fleet-admins".into()],
            },
            refresh_seconds: 300,
            leeway_seconds: 30,
        }),
    }
}

fn claims(sub: &str, groups: &[&str], issuer: &str, audience: &str, expires_in: i64) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    serde_json::json!({
        "iss": issuer, "aud": audience, "sub": sub, "iat": now, "exp": now + expires_in,
        "groups": groups,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_tokens_are_checked_for_signature_issuer_audience_and_expiry() {
    let idp = TestKey::generate();
    let attacker = TestKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let auth = oidc_auth(&idp, dir.path());
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, auth, ..SandboxOptions::default() }).await;
    let as_token = |token: String| client_with(Some(&token));

    let refused = [
        (
            "a wrong signature",
            attacker.sign(KID, &claims("mallory", &["fleet-admins"], ISSUER, AUDIENCE, 300)),
            "signature",
        ),
        (
            "an unknown kid",
            attacker.sign("other-key", &claims("mallory", &["fleet-admins"], ISSUER, AUDIENCE, 300)),
            "kid",
        ),
        (
            "a wrong issuer",
            idp.sign(KID, &claims("alice", &["fleet-admins"], "https://evil.test", AUDIENCE, 300)),
            "issuer",
        ),
        (
            "a wrong audience",
            idp.sign(KID, &claims("alice", &["fleet-admins"], ISSUER, "another-app", 300)),
            "audience",
        ),
        ("a past expiry", idp.sign(KID, &claims("alice", &["fleet-admins"], ISSUER, AUDIENCE, -120)), "expired"),
    ];
    for (what, token, word) in refused {
        let response = call(&as_token(token), &sandbox, &Method::GET, "/v1/rollouts").await;
        assert_problem(&response, StatusCode::UNAUTHORIZED, what);
        let detail = detail(response).await;
        assert!(detail.contains(word), "{what}: {detail}");
    }

    // Right tokens pass with the role their groups grant (the highest wins).
    let reader = as_token(idp.sign(KID, &claims("rita", &["fleet-readers", "unrelated"], ISSUER, AUDIENCE, 300)));
    assert_eq!(call(&reader, &sandbox, &Method::GET, "/v1/rollouts").await.status(), StatusCode::OK);
    let response = reader
        .post(format!("{}/v1/rollouts", sandbox.api))
        .json(&sim_rollout("oidc", 1, 1, 1, 60))
        .send()
        .await
        .unwrap();
    assert_problem(&response, StatusCode::FORBIDDEN, "a reader creates");
    let deployer =
        as_token(idp.sign(KID, &claims("dave", &["fleet-readers", "fleet-deployers"], ISSUER, AUDIENCE, 300)));
    let response = deployer
        .post(format!("{}/v1/rollouts", sandbox.api))
        .json(&sim_rollout("oidc", 1, 1, 1, 60))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED, "{}", response.text().await.unwrap_or_default());
    assert_problem(
        &call(&deployer, &sandbox, &Method::GET, "/v1/audit").await,
        StatusCode::FORBIDDEN,
        "an operator reads the audit log",
    );
    let admin = as_token(idp.sign(KID, &claims("ada", &["fleet-admins"], ISSUER, AUDIENCE, 300)));
    let audit: serde_json::Value = call(&admin, &sandbox, &Method::GET, "/v1/audit").await.json().await.unwrap();
    let created =
        audit["entries"].as_array().unwrap().iter().find(|e| e["status"] == 201).expect("the creation is audited");
    assert_eq!(created["actor"], "dave");
    assert_eq!(created["actor_kind"], "jwt");
    assert_eq!(created["role"], "operator");
    let reader_refusal = audit["entries"].as_array().unwrap().iter().find(|e| e["actor"] == "rita").expect("audited");
    assert_eq!(reader_refusal["status"], 403);
    // A valid token that grants no role: 403, not 401.
    let nobody = as_token(idp.sign(KID, &claims("nora", &["marketing"], ISSUER, AUDIENCE, 300)));
    let response = call(&nobody, &sandbox, &Method::GET, "/v1/rollouts").await;
    assert_problem(&response, StatusCode::FORBIDDEN, "no role");
    assert!(detail(response).await.contains("grants no fleetpatch role"));
    sandbox.stop().await;
}

// ---------------------------------------------------------------- audit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_each_mutating_call_of_a_session() {
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, ..SandboxOptions::default() }).await;
    let operator = client_with(Some(&sandbox.api_key("deployer", Role::Operator, None).await));
    let viewer = client_with(Some(&sandbox.api_key("watcher", Role::Viewer, None).await));
    // No workers: the rollout stays running, so each step is allowed.
    let response = operator
        .post(format!("{}/v1/rollouts", sandbox.api))
        .json(&sim_rollout("audited", 3, 1, 1, 60))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let id: Uuid = response.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    let post = |client: &reqwest::Client, action: &str| {
        client.post(format!("{}/v1/rollouts/{id}/{action}", sandbox.api)).send()
    };
    assert_eq!(post(&operator, "pause").await.unwrap().status(), StatusCode::OK);
    assert_eq!(post(&operator, "resume").await.unwrap().status(), StatusCode::OK);
    assert_eq!(post(&viewer, "abort").await.unwrap().status(), StatusCode::FORBIDDEN);
    assert_eq!(post(&operator, "abort").await.unwrap().status(), StatusCode::OK);
    // Reads are not audited.
    assert_eq!(
        operator.get(format!("{}/v1/rollouts/{id}", sandbox.api)).send().await.unwrap().status(),
        StatusCode::OK
    );

    let page: serde_json::Value =
        sandbox.http.get(format!("{}/v1/audit?rollout={id}", sandbox.api)).send().await.unwrap().json().await.unwrap();
    let entries = page["entries"].as_array().expect("entries");
    let seen: Vec<(String, String, String, String, u64)> = entries
        .iter()
        .rev()
        .map(|e| {
            assert_eq!(e["rollout_id"], id.to_string());
            assert_eq!(e["actor_kind"], "api_key");
            assert!(e["source"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
            assert!(e["at"].as_str().is_some());
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["role"].as_str().unwrap().to_owned(),
                e["method"].as_str().unwrap().to_owned(),
                e["route"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let row = |actor: &str, role: &str, route: &str, status: u64| {
        (actor.to_owned(), role.to_owned(), "POST".to_owned(), route.to_owned(), status)
    };
    assert_eq!(
        seen,
        vec![
            row("deployer", "operator", "/v1/rollouts", 201),
            row("deployer", "operator", "/v1/rollouts/{id}/pause", 200),
            row("deployer", "operator", "/v1/rollouts/{id}/resume", 200),
            row("watcher", "viewer", "/v1/rollouts/{id}/abort", 403),
            row("deployer", "operator", "/v1/rollouts/{id}/abort", 200),
        ]
    );
    // Paging: two at a time, newest first, until `next_before` is null.
    let mut before: Option<i64> = None;
    let mut paged = 0;
    loop {
        let url = match before {
            Some(b) => format!("{}/v1/audit?rollout={id}&limit=2&before={b}", sandbox.api),
            None => format!("{}/v1/audit?rollout={id}&limit=2", sandbox.api),
        };
        let page: serde_json::Value = sandbox.http.get(url).send().await.unwrap().json().await.unwrap();
        paged += page["entries"].as_array().unwrap().len();
        match page["next_before"].as_i64() {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, 5);
    sandbox.stop().await;
}

/// The console takes an OIDC token as its session exactly as the API takes
/// it as a bearer: checked by the same authenticator, with the role its
/// groups grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_takes_an_oidc_token_as_its_session() {
    let idp = TestKey::generate();
    let dir = tempfile::tempdir().unwrap();
    let auth = oidc_auth(&idp, dir.path());
    let sandbox = Sandbox::start(SandboxOptions { workers: 0, auth, ..SandboxOptions::default() }).await;
    let id = sandbox.create_rollout(sim_rollout("oidc-console", 2, 1, 1, 60)).await;
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let login = |token: String| {
        let browser = browser.clone();
        let url = format!("{}/login", sandbox.api);
        async move {
            let response = browser
                .post(url)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("credential={token}"))
                .send()
                .await
                .expect("POST /login");
            let status = response.status();
            let cookie = response.headers().get("set-cookie").map(|v| v.to_str().unwrap().to_owned());
            (status, cookie, response.text().await.unwrap_or_default())
        }
    };

    let (status, _, page) = login(idp.sign(KID, &claims("eve", &["fleet-readers"], ISSUER, AUDIENCE, -120))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "an expired token opens no session");
    assert!(page.contains("expired"), "{page}");
    let (status, _, page) = login(idp.sign(KID, &claims("nora", &["unrelated"], ISSUER, AUDIENCE, 300))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a token without a role opens no session");
    assert!(page.contains("grants no fleetpatch role"), "{page}");

    let token = idp.sign(KID, &claims("dave", &["fleet-deployers"], ISSUER, AUDIENCE, 300));
    let (status, cookie, _) = login(token.clone()).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(cookie.expect("a session cookie").starts_with(&format!("fleetpatch_session={token};")));
    let page = browser
        .get(format!("{}/rollouts/{id}", sandbox.api))
        .header("cookie", format!("fleetpatch_session={token}"))
        .send()
        .await
        .expect("GET the rollout page");
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert!(page.contains("dave") && page.contains("action-pause"), "an operator's token shows its buttons");
    let csrf = fleetpatch_scheduler::console::csrf_token(&token);
    let paused = browser
        .post(format!("{}/rollouts/{id}/pause", sandbox.api))
        .header("cookie", format!("fleetpatch_session={token}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .expect("POST pause");
    assert_eq!(paused.status(), StatusCode::SEE_OTHER);
    let rollout = sandbox.store.rollout(id).await.unwrap();
    assert_eq!(rollout.state, fleetpatch_proto::state::RolloutState::Paused);
    let audit = sandbox
        .store
        .audit_entries(fleetpatch_store::AuditQuery { rollout_id: Some(id), before: None, limit: 10 })
        .await
        .unwrap();
    assert!(audit.iter().any(|e| e.actor == "dave" && e.route == "/rollouts/{id}/pause" && e.status == 303));
    sandbox.stop().await;
}
