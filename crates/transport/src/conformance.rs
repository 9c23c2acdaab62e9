//! The [`Transport`] contract, written once and run against every
//! implementation (`sim` here, `ssh` against real sshd peers, `smb` against
//! a real Samba): [`transport_conformance_suite!`](crate::transport_conformance_suite).
//!
//! What every transport promises the worker:
//! * the probe says which of the rollout's patches are installed, by their
//!   detection rules, and that the account is an administrator; the
//!   verification scan agrees with it;
//! * staging is repeatable (a retried job stages again), and the files are
//!   on the target afterwards;
//! * the agent of a deployment is started at most once: the first
//!   `start_agent` of a staged deployment starts it, and a second one (a job
//!   taken over from a dead worker) never answers `Started`, whatever the
//!   first one did;
//! * starting an agent that was never staged fails, and not as a transient
//!   error (retrying cannot help);
//! * cleanup removes the staged files unless asked to keep them, and is
//!   idempotent, also for a deployment that was never staged;
//! * an unreachable target is a transient error (the worker retries it with
//!   backoff), and so is its reachability check, which a reachable target
//!   passes with no credential at all.
//!
//! Feature `test-support`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetpatch_proto::plan::{self, DeploymentPlan, InstallerKind, PlanPatch, RebootPolicy};

use crate::{AgentStart, Deployment, PatchProbe, StagedFile, TargetSpec, Transport};

/// A deployment of one small installer (patch index 1), written into `dir`
/// if it is not there yet, with `agent_binary` to stage beside it.
pub fn one_patch_deployment(
    dir: &Path,
    target: &TargetSpec,
    attempt: u32,
    installer: InstallerKind,
    file_name: &str,
    agent_binary: Option<PathBuf>,
) -> Deployment {
    use sha2::Digest;
    let content = format!("fleetpatch conformance installer {file_name}\n").into_bytes();
    let source = dir.join(file_name);
    std::fs::write(&source, &content).expect("write the test installer");
    let sha256 = hex::encode(sha2::Sha256::digest(&content));
    Deployment {
        plan: DeploymentPlan {
            version: plan::PLAN_VERSION,
            deployment_id: plan::deployment_id(target.target_id, attempt),
            target_id: target.target_id,
            // Nothing listens there: agents that start keep their reports.
            attempt: 1,
            collector_url: "http://127.0.0.1:9".into(),
            collector_ca_pem: None,
            token: "conformance".into(),
            heartbeat_seconds: 30,
            patches: vec![PlanPatch {
                index: 1,
                name: "patch 1".into(),
                file: file_name.into(),
                sha256: sha256.clone(),
                size: 0,
                sources: Vec::new(),
                installer,
                arguments: String::new(),
                success_codes: vec![0],
                reboot_codes: vec![3010],
                timeout_seconds: 60,
            }],
            reboot: RebootPolicy::Never,
            reboot_command: None,
            keep_files: false,
            relay_ca_pem: None,
            download_timeout_seconds: fleetpatch_proto::plan::DEFAULT_DOWNLOAD_TIMEOUT_SECONDS,
        },
        agent_binary,
        files: vec![StagedFile { name: file_name.into(), source, sha256, size: content.len() as u64 }],
    }
}

/// What a transport's conformance run needs: the transport and targets set
/// up so the contract can be observed.
#[async_trait::async_trait]
pub trait TransportFixture: Send + Sync {
    /// A new transport instance each call, as each worker builds its own:
    /// two calls are two workers reaching the same targets.
    fn transport(&self) -> Arc<dyn Transport>;
    /// A reachable target, with administrator credentials, on which
    /// [`TransportFixture::patches`]`[0]` is installed and `[1]` is not.
    fn target(&self) -> TargetSpec;
    /// The same kind of target where nothing listens.
    fn unreachable_target(&self) -> TargetSpec;
    /// Two patches with detection rules of this transport's kind.
    fn patches(&self) -> Vec<PatchProbe>;
    /// A deployment of patch 1 (one small installer) to `target`, attempt
    /// `attempt`, with whatever agent binary the transport stages.
    fn deployment(&self, target: &TargetSpec, attempt: u32) -> Deployment;
    /// Whether the deployment's staged files are on the target now.
    async fn staged(&self, target: &TargetSpec, deployment_id: &str) -> bool;
    /// What the first `start_agent` of a staged deployment does on this
    /// fixture's peer. Only a peer that cannot run agents at all may say
    /// anything but [`FirstStart::Starts`], and it names the known failure.
    fn first_start(&self) -> FirstStart {
        FirstStart::Starts
    }
}

/// What the first `start_agent` of a staged deployment must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstStart {
    /// It answers `Started`.
    Starts,
    /// A known bug or limit of the peer: the start fails today, with an
    /// error whose message contains `error_contains`. The suite asserts
    /// that failure (so it notices when it changes); `tracked_in` names the
    /// issue that brings a peer on which the agent starts.
    FailsToday { error_contains: &'static str, tracked_in: &'static str },
}

/// Probe: patch 0 installed, patch 1 not, administrator rights.
pub async fn probe_reports_installed_patches(fixture: &dyn TransportFixture) {
    let transport = fixture.transport();
    let report = transport.probe(&fixture.target(), &fixture.patches()).await.expect("probe");
    assert!(!report.os.is_empty() && !report.arch.is_empty(), "{report:?}");
    assert!(report.is_admin, "the fixture's account is an administrator: {report:?}");
    assert_eq!(report.installed, [0], "{report:?}");
    let verify = transport.verify(&fixture.target(), &fixture.patches()).await.expect("verify");
    assert_eq!((verify.installed, verify.missing), (vec![0], vec![1]));
}

/// Staging twice works; the files are there; cleanup removes them and can
/// run again.
pub async fn stage_is_repeatable_and_cleanup_idempotent(fixture: &dyn TransportFixture) {
    let transport = fixture.transport();
    let target = fixture.target();
    let deployment = fixture.deployment(&target, 1);
    transport.stage(&target, &deployment).await.expect("first stage");
    transport.stage(&target, &deployment).await.expect("a retried stage");
    assert!(fixture.staged(&target, deployment.id()).await, "nothing staged for {}", deployment.id());
    transport.cleanup(&target, deployment.id(), true).await.expect("cleanup keeping the files");
    assert!(fixture.staged(&target, deployment.id()).await, "keep_files did not keep them");
    transport.cleanup(&target, deployment.id(), false).await.expect("cleanup");
    assert!(!fixture.staged(&target, deployment.id()).await, "cleanup left the files of {}", deployment.id());
    transport.cleanup(&target, deployment.id(), false).await.expect("a second cleanup");
    let never = fixture.deployment(&target, 9);
    transport.cleanup(&target, never.id(), false).await.expect("cleanup of a deployment never staged");
}

/// The first start of a staged deployment starts its agent; a second start
/// of the same deployment never says `Started`.
pub async fn agent_starts_at_most_once(fixture: &dyn TransportFixture) {
    let transport = fixture.transport();
    let target = fixture.target();
    let deployment = fixture.deployment(&target, 2);
    transport.stage(&target, &deployment).await.expect("stage");
    let first = transport.start_agent(&target, &deployment).await;
    match fixture.first_start() {
        FirstStart::Starts => {
            assert!(
                matches!(first, Ok(AgentStart::Started)),
                "the first start_agent did not start the agent: {first:?}"
            )
        }
        FirstStart::FailsToday { error_contains, tracked_in } => match &first {
            Err(error) => assert!(
                error.to_string().contains(error_contains),
                "the first start_agent failed otherwise than known ({error_contains:?}, {tracked_in}): {error}"
            ),
            Ok(outcome) => panic!(
                "the first start_agent succeeded ({outcome:?}) where it is known to fail: the peer can run agents \
                 now, so drop FirstStart::FailsToday from the fixture ({tracked_in})"
            ),
        },
    }
    let second = transport.start_agent(&target, &deployment).await;
    assert!(
        !matches!(second, Ok(AgentStart::Started)),
        "a second start_agent started the agent again (first: {first:?})"
    );
    transport.cleanup(&target, deployment.id(), false).await.expect("cleanup");
}

/// A worker that takes a deployment over from another (which died after
/// starting the agent) never starts a second agent: the answer comes from
/// the target itself, not from the first worker's memory.
pub async fn agent_starts_at_most_once_across_workers(fixture: &dyn TransportFixture) {
    let (first_worker, second_worker) = (fixture.transport(), fixture.transport());
    let target = fixture.target();
    let deployment = fixture.deployment(&target, 4);
    first_worker.stage(&target, &deployment).await.expect("stage");
    let first = first_worker.start_agent(&target, &deployment).await;
    if fixture.first_start() == FirstStart::Starts {
        assert!(matches!(first, Ok(AgentStart::Started)), "the first start_agent did not start the agent: {first:?}");
    }
    // The second worker stages again (a takeover repeats the steps) and starts.
    second_worker.stage(&target, &deployment).await.expect("stage again from the second worker");
    let second = second_worker.start_agent(&target, &deployment).await;
    assert!(
        !matches!(second, Ok(AgentStart::Started)),
        "a second worker started the deployment's agent again (first: {first:?}, second: {second:?})"
    );
    second_worker.cleanup(&target, deployment.id(), false).await.expect("cleanup");
}

/// Starting what was never staged fails for good.
pub async fn start_without_stage_fails_permanently(fixture: &dyn TransportFixture) {
    let transport = fixture.transport();
    let target = fixture.target();
    let deployment = fixture.deployment(&target, 3);
    let error = transport.start_agent(&target, &deployment).await.expect_err("nothing was staged");
    assert!(!error.is_transient(), "{error:?}");
}

/// Unreachable targets are transient errors, at every step.
pub async fn unreachable_targets_are_transient(fixture: &dyn TransportFixture) {
    let transport = fixture.transport();
    let target = fixture.unreachable_target();
    let error = transport.probe(&target, &fixture.patches()).await.expect_err("nothing listens");
    assert!(error.is_transient(), "{error:?}");
    let deployment = fixture.deployment(&target, 1);
    let error = transport.stage(&target, &deployment).await.expect_err("nothing listens");
    assert!(error.is_transient(), "{error:?}");
    let error = transport.cleanup(&target, deployment.id(), false).await.expect_err("nothing listens");
    assert!(error.is_transient(), "{error:?}");
    let error = transport.reachable(&target).await.expect_err("nothing listens");
    assert!(error.is_transient(), "{error:?}");
}

/// The reachability check of an offline target: a reachable one answers,
/// without a credential (none is read for it).
pub async fn a_reachable_target_answers_the_check_without_a_credential(fixture: &dyn TransportFixture) {
    let transport = fixture.transport();
    let target = TargetSpec { credential: None, ..fixture.target() };
    transport.reachable(&target).await.expect("the target answers");
}

/// Generates one `#[tokio::test]` per contract item. `$fixture` is an
/// expression giving a `Future` of a [`TransportFixture`] (built per test,
/// dropped after).
#[macro_export]
macro_rules! transport_conformance_suite {
    ($fixture:expr) => {
        $crate::transport_conformance_suite!(@tests $fixture;
            probe_reports_installed_patches,
            stage_is_repeatable_and_cleanup_idempotent,
            agent_starts_at_most_once,
            agent_starts_at_most_once_across_workers,
            start_without_stage_fails_permanently,
            unreachable_targets_are_transient,
            a_reachable_target_answers_the_check_without_a_credential);
    };
    (@tests $fixture:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let fixture = $fixture.await;
                $crate::conformance::$name(&fixture).await;
            }
        )*
    };
}
