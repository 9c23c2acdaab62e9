//! Installers pulled from relays, end to end: private OpenSSH peers on
//! loopback in two "sites", a real `fleetpatch relay` per site in front of
//! the sandbox's scheduler (its `GET /v1/content/{sha256}`, with a viewer
//! key), the real agent downloading over HTTP, the real collector.
//!
//! What is asserted is what an operator relies on: every installer leaves
//! the central content store once per relay, every target installs it
//! once, a corrupted or vanishing relay is caught by the agent, and a
//! relay that does not answer the worker is routed around (or not, when
//! the rollout says so), with the reason on the target.

use std::time::Duration;

use fleetpatch_proto::state::{PatchState, RolloutState, TargetState};
use fleetpatch_relay::{RelayHandle, RelayOptions};
use fleetpatch_runtime::{Health, Shutdown};
use fleetpatch_tests::ssh::{rollout, script, ssh_sandbox, ssh_target, Patch, FLEET_KEY};
use fleetpatch_tests::Sandbox;
use fleetpatch_transport_ssh::test_support::{SshPeer, DPKG_ROOT_VAR};
use sha2::Digest;

/// A relay of the sandbox's scheduler, on `listen`, with its own cache and shutdown.
struct Relay {
    handle: RelayHandle,
    shutdown: Shutdown,
    options: RelayOptions,
}

impl Relay {
    async fn start(options: RelayOptions) -> Relay {
        let shutdown = Shutdown::new();
        let handle = fleetpatch_relay::start(options.clone(), Health::new(), shutdown.clone())
            .await
            .unwrap_or_else(|error| panic!("start a relay: {error}"));
        Relay { handle, shutdown, options }
    }

    fn url(&self) -> String {
        format!("http://{}", self.handle.local_addr)
    }

    /// Stops it at once (no drain: open downloads are cut) and waits until it is gone.
    async fn kill(self) -> RelayOptions {
        self.shutdown.trigger();
        let _ = self.handle.join.await;
        self.options
    }
}

/// A script installer that appends one line to `runs` in the peer's own
/// directory each time it runs; `padding` bytes after its `exit` make it
/// as large as a real installer.
async fn counting_script(sandbox: &Sandbox, name: &str, padding: usize) -> Patch {
    let mut body = format!("echo \"{name} ran\" >> \"${DPKG_ROOT_VAR}/runs\"\nexit 0\n");
    let line = "# padding to make this installer as large as a real one ..............................\n";
    while body.len() < padding {
        body.push_str(line);
    }
    script(sandbox, name, &body).await
}

/// The lines the counting scripts wrote on a peer.
fn runs(peer: &SshPeer) -> Vec<String> {
    std::fs::read_to_string(peer.dpkg_root().join("runs")).unwrap_or_default().lines().map(str::to_owned).collect()
}

fn site_target(peer: &SshPeer, site: &str) -> serde_json::Value {
    let mut target = ssh_target(peer, FLEET_KEY);
    target["labels"]["site"] = serde_json::json!(site);
    target
}

fn relay_rule(site: &str, url: &str) -> serde_json::Value {
    serde_json::json!({"match": format!("site={site}"), "url": url})
}

/// A port nothing listens on.
fn closed_port_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

/// The target of a site, and its patches.
async fn by_site(
    sandbox: &Sandbox,
    rollout: uuid::Uuid,
    site: &str,
) -> (fleetpatch_store::Target, Vec<fleetpatch_store::TargetPatch>) {
    let target = sandbox.all_targets(rollout).await.into_iter().find(|t| t.labels["site"] == site).unwrap();
    let patches = sandbox.store.target_patches(target.id).await.unwrap();
    (target, patches)
}

fn peer_of<'a>(peers: &'a [SshPeer], target: &fleetpatch_store::Target) -> &'a SshPeer {
    peers.iter().find(|p| Some(p.port()) == target.port).expect("a peer per target")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_targets_in_two_sites_pull_every_installer_once_per_relay() {
    let (fleet, sandbox) = ssh_sandbox(4, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let paris = Relay::start(sandbox.relay_options(dir.path(), "paris").await).await;
    let lyon = Relay::start(sandbox.relay_options(dir.path(), "lyon").await).await;
    let first = counting_script(&sandbox, "relay-first", 256 * 1024).await;
    let second = counting_script(&sandbox, "relay-second", 64 * 1024).await;
    let peers = fleet.peers();
    let sites = ["paris", "paris", "lyon", "lyon"];
    let mut request = rollout(
        "two-sites",
        &[&first, &second],
        peers.iter().zip(sites).map(|(peer, site)| site_target(peer, site)).collect(),
    );
    request["relays"] = serde_json::json!([relay_rule("paris", &paris.url()), relay_rule("lyon", &lyon.url())]);
    let id = sandbox.create_rollout(request).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(120)).await;

    for target in sandbox.all_targets(id).await {
        let peer = peer_of(peers, &target);
        assert_eq!(target.state, TargetState::Succeeded, "{}: {:?}\n{}", target.host, target.error, peer.log());
        let relay = if target.labels["site"] == "paris" { &paris } else { &lyon };
        assert_eq!(target.delivery, Some(format!("relay {}", relay.url())), "the target shows where it pulled from");
        // Each installer ran once, and it was the downloaded one: the agent
        // checked its sha256 before it ran it.
        assert_eq!(runs(peer), ["relay-first ran", "relay-second ran"], "port {}", peer.port());
        for patch in sandbox.store.target_patches(target.id).await.unwrap() {
            assert_eq!((patch.state, patch.exit_code), (PatchState::Succeeded, Some(0)), "{patch:?}");
        }
    }
    let bytes = first.size + second.size;
    for (name, relay) in [("paris", &paris), ("lyon", &lyon)] {
        let stats = relay.handle.stats();
        // Every installer left the content store once for this relay, and was
        // served to each of its two targets.
        assert_eq!((stats.upstream_fetches, stats.upstream_bytes), (2, bytes), "{name}: {stats:?}");
        assert_eq!(stats.served_bytes, 2 * bytes, "{name}: {stats:?}");
        assert_eq!(stats.hits + stats.misses, 4, "{name}: {stats:?}");
        assert_eq!(stats.upstream_mismatches, 0, "{name}: {stats:?}");
    }
    sandbox.stop().await;
}

/// A relay that answers every request with `size` bytes of the wrong
/// content: a hostile or broken cache.
async fn lying_relay(size: u64) -> String {
    use axum::extract::Path;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/readyz", axum::routing::get(|| async { "ready" })).route(
        "/v1/content/{sha256}",
        axum::routing::get(move |Path(_sha): Path<String>| async move { vec![b'x'; size as usize] }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_bytes_are_caught_and_a_relay_that_does_not_answer_is_routed_around_or_not() {
    let (fleet, sandbox) = ssh_sandbox(4, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let installer = counting_script(&sandbox, "relay-checked", 16 * 1024).await;
    // A real relay whose cached copy rotted on its disk.
    let options = sandbox.relay_options(dir.path(), "rotten").await;
    std::fs::create_dir_all(&options.cache_dir).unwrap();
    let mut rotten = vec![b'#'; installer.size as usize];
    rotten[..2].copy_from_slice(b"#!");
    std::fs::write(options.cache_dir.join(&installer.sha256), &rotten).unwrap();
    assert_ne!(hex::encode(sha2::Sha256::digest(&rotten)), installer.sha256);
    let healing = Relay::start(options).await;
    let liar = lying_relay(installer.size).await;
    let dead = closed_port_url();
    let peers = fleet.peers();
    let sites = ["rotten", "liar", "dead", "dead-strict"];
    let mut request = rollout(
        "bad-relays",
        &[&installer],
        peers.iter().zip(sites).map(|(peer, site)| site_target(peer, site)).collect(),
    );
    request["relays"] =
        serde_json::json!(
            [relay_rule("rotten", &healing.url()), relay_rule("liar", &liar), relay_rule("dead", &dead),]
        );
    let id = sandbox.create_rollout(request).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(120)).await;

    // The rotten copy: the agent saw the mismatch, asked again with
    // no-cache, the relay found its copy corrupt, fetched it again, and the
    // second download installed.
    let (target, _) = by_site(&sandbox, id, "rotten").await;
    assert_eq!(target.state, TargetState::Succeeded, "{:?}", target.error);
    assert_eq!(runs(peer_of(peers, &target)), ["relay-checked ran"]);
    let stats = healing.handle.stats();
    assert_eq!((stats.revalidations_corrupt, stats.upstream_fetches), (1, 1), "{stats:?}");

    // The liar: two mismatches, then a clear failure; nothing ran.
    let (target, patches) = by_site(&sandbox, id, "liar").await;
    assert_eq!(target.state, TargetState::Failed);
    assert!(runs(peer_of(peers, &target)).is_empty(), "a corrupted installer ran");
    let tail = patches[0].output_tail.clone().unwrap_or_default();
    assert!(
        tail.contains(&liar) && tail.contains(&installer.sha256) && tail.contains("downloaded twice"),
        "the failure names the source and the digests: {tail}"
    );
    assert_eq!(patches[0].state, PatchState::Failed);

    // A relay that does not answer the worker: pushed instead, and the target says why.
    let (target, _) = by_site(&sandbox, id, "dead").await;
    assert_eq!(target.state, TargetState::Succeeded, "{:?}", target.error);
    assert_eq!(
        target.delivery,
        Some(format!("push: relay {dead} did not answer the worker (connection refused or unreachable)"))
    );
    assert_eq!(runs(peer_of(peers, &target)), ["relay-checked ran"]);
    let (target, _) = by_site(&sandbox, id, "dead-strict").await;
    assert_eq!(target.delivery.as_deref(), Some("push"), "no rule matches dead-strict in this rollout");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_must_not_be_bypassed_fails_its_target_with_the_reason() {
    let (fleet, sandbox) = ssh_sandbox(1, |_| {}).await;
    let installer = counting_script(&sandbox, "relay-strict", 1024).await;
    let dead = closed_port_url();
    let mut request = rollout("strict", &[&installer], vec![site_target(&fleet.peers()[0], "paris")]);
    request["relays"] = serde_json::json!([relay_rule("paris", &dead)]);
    request["relay_fallback"] = serde_json::json!("fail");
    let id = sandbox.create_rollout(request).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.state, TargetState::Failed);
    let error = target.error.unwrap_or_default();
    assert!(error.contains(&dead) && error.contains("relay_fallback is fail"), "{error}");
    assert!(runs(&fleet.peers()[0]).is_empty(), "the installer was pushed anyway");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_relay_without_a_ca_for_the_agent_fails_its_target_naming_the_setting() {
    let (fleet, sandbox) = ssh_sandbox(1, |_| {}).await;
    let installer = counting_script(&sandbox, "relay-https", 1024).await;
    let mut request = rollout("https-relay", &[&installer], vec![site_target(&fleet.peers()[0], "paris")]);
    request["relays"] = serde_json::json!([relay_rule("paris", "https://127.0.0.1:1")]);
    let id = sandbox.create_rollout(request).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(60)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.state, TargetState::Failed);
    let error = target.error.unwrap_or_default();
    assert!(error.contains("https://127.0.0.1:1") && error.contains("worker.relay_ca_file"), "{error}");
    assert!(runs(&fleet.peers()[0]).is_empty());
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_download_is_resumed_and_nothing_is_installed_twice() {
    let (fleet, sandbox) = ssh_sandbox(1, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let installer = counting_script(&sandbox, "relay-big", 6 << 20).await;
    // Slow enough that the download is under way when the relay dies.
    let mut options = sandbox.relay_options(dir.path(), "flaky").await;
    options.max_rate_bytes_per_second = Some(2 << 20);
    let relay = Relay::start(options).await;
    let address = relay.handle.local_addr;
    let mut request = rollout("resume", &[&installer], vec![site_target(&fleet.peers()[0], "paris")]);
    request["relays"] = serde_json::json!([relay_rule("paris", &relay.url())]);
    let id = sandbox.create_rollout(request).await;
    sandbox
        .wait_for("the agent to be half way", Duration::from_secs(60), async || {
            let served = relay.handle.stats().served_bytes;
            (served > installer.size / 3).then_some(served)
        })
        .await;
    let mut options = relay.kill().await;
    // Back on the same address, with the same cache, a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    options.listen = address.to_string();
    options.max_rate_bytes_per_second = None;
    let relay = Relay::start(options).await;
    sandbox.wait_for_rollout_state(id, RolloutState::Completed, Duration::from_secs(120)).await;
    let target = sandbox.all_targets(id).await.remove(0);
    assert_eq!(target.state, TargetState::Succeeded, "{:?}", target.error);
    assert_eq!(runs(&fleet.peers()[0]), ["relay-big ran"], "installed exactly once");
    // The agent resumed where it stopped: the restarted relay served only the rest.
    let stats = relay.handle.stats();
    assert!(
        stats.served_bytes > 0 && stats.served_bytes < installer.size,
        "the second relay served {} of {} bytes: the download started over",
        stats.served_bytes,
        installer.size
    );
    sandbox.stop().await;
}
