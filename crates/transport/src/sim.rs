//! A simulated fleet, for demos, load and fault tests.
//!
//! Every host gets a behaviour drawn from a seed and its name (so the same
//! seed gives the same fleet), or named explicitly by the target label
//! `sim.behaviour` or by [`SimOptions::overrides`]. Its agents are tasks that
//! post real reports over HTTP to the collector, signed with the target's token,
//! exactly as the real agent does: the simulation stops at the target
//! machine, everything from the collector on is the real pipeline.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetpatch_proto::plan::{DeploymentPlan, PlanPatch, RebootPolicy};
use fleetpatch_proto::report_auth::{SignedRequest, SigningKey};
use fleetpatch_proto::v1::{self, agent_report::Kind};
use fleetpatch_runtime::ConfigError;
use prost::Message;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{AgentStart, Deployment, Error, PatchProbe, ProbeReport, Result, TargetSpec, VerifyReport};

/// What a simulated host does when deployed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostBehaviour {
    /// Every patch installs.
    Healthy,
    /// The first patch's installer exits 1603; the others install.
    FailPatch,
    /// Connection refused on every attempt.
    Unreachable,
    /// The agent reports the first `started` and then falls silent forever.
    Hang,
    /// One patch takes [`SimOptions::slow_patch_ms`], with heartbeats.
    SlowPatch,
    /// Every patch exits 3010 (installed, reboot required).
    RebootRequired,
    /// A machine that is switched off for a while: connection refused on
    /// its first [`SimOptions::comes_back_after`] contacts (probes and
    /// reachability checks), healthy from then on.
    ComesBack,
    /// Every patch exits 3010 (installed, reboot required), and once the
    /// machine reboots it never answers again.
    NoReturn,
}

impl HostBehaviour {
    pub const LABEL: &'static str = "sim.behaviour";
}

/// Rates and timings of the simulated fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimOptions {
    pub seed: u64,
    /// Latency of each remote step (probe, stage, start), drawn per call.
    pub min_latency_ms: u64,
    pub max_latency_ms: u64,
    /// Time one patch takes to install.
    pub patch_ms: u64,
    pub slow_patch_ms: u64,
    pub fail_rate: f64,
    pub unreachable_rate: f64,
    pub hang_rate: f64,
    pub slow_patch_rate: f64,
    /// Chance that a patch is already installed when probed.
    pub installed_rate: f64,
    /// Contacts a `comes_back` host refuses before it answers.
    pub comes_back_after: u32,
    /// Contacts a host refuses while it reboots (after its agent asked for
    /// a reboot), before it answers on a new boot.
    pub reboot_contacts: u32,
    /// Behaviour by host name, over the drawn one.
    pub overrides: BTreeMap<String, HostBehaviour>,
    /// Workers only: the simulated fleet runs in another process
    /// (`fleetpatch sim-fleet`) at this URL instead of inside the worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_url: Option<String>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            seed: 1,
            min_latency_ms: 1,
            max_latency_ms: 5,
            patch_ms: 50,
            slow_patch_ms: 5_000,
            fail_rate: 0.0,
            unreachable_rate: 0.0,
            hang_rate: 0.0,
            slow_patch_rate: 0.0,
            installed_rate: 0.0,
            comes_back_after: 3,
            reboot_contacts: 2,
            overrides: BTreeMap::new(),
            fleet_url: None,
        }
    }
}

impl SimOptions {
    /// Checks the rates; the error names the key (without the `sim.`
    /// section: [`ConfigError::in_section`]).
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        for (key, rate) in [
            ("fail_rate", self.fail_rate),
            ("unreachable_rate", self.unreachable_rate),
            ("hang_rate", self.hang_rate),
            ("slow_patch_rate", self.slow_patch_rate),
            ("installed_rate", self.installed_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::invalid(key, format!("must be between 0 and 1, got {rate}")));
            }
        }
        if self.fail_rate + self.unreachable_rate + self.hang_rate + self.slow_patch_rate > 1.0 {
            return Err(ConfigError::invalid(
                "fail_rate + unreachable_rate + hang_rate + slow_patch_rate",
                "must not exceed 1",
            ));
        }
        if self.min_latency_ms > self.max_latency_ms {
            return Err(ConfigError::invalid(
                "min_latency_ms",
                format!("({}) must not exceed max_latency_ms ({})", self.min_latency_ms, self.max_latency_ms),
            ));
        }
        Ok(())
    }
}

struct AgentSlot {
    cancel: CancellationToken,
    done: Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Default)]
struct FleetState {
    /// Contacts refused so far, per `comes_back` host.
    refused_contacts: HashMap<String, u32>,
    /// Boots since the fleet started, per host that rebooted.
    boots: HashMap<String, u32>,
    /// Contacts a rebooting host still refuses.
    rebooting: HashMap<String, u32>,
    /// `no_return` hosts that rebooted: they never answer again.
    gone: HashSet<String>,
    staged: HashSet<String>,
    agents: HashMap<String, AgentSlot>,
    starts: HashMap<String, u32>,
    /// Patch names installed per host.
    installed: HashMap<String, HashSet<String>>,
    /// Reports the collector acknowledged, per plan (target id) and agent run.
    acknowledged: HashMap<String, u64>,
    /// Reports the agents produced (each once, however often it was sent).
    sent: HashMap<String, u64>,
    /// Reports whose sending ended with a refusal (a 4xx other than 408/429).
    refused: HashMap<String, u64>,
    /// What each refusal said: the report's seq, the status and the
    /// problem's detail (the first few per target).
    refusals: HashMap<String, Vec<String>>,
    /// The report each agent is sending right now, by deployment: (target,
    /// "seq N kind"), until the collector answers.
    sending: HashMap<String, (String, String)>,
    /// Reports whose sending a cleanup cut short (the agent stopped while
    /// it waited for the collector's answer), per target.
    cut_by_cleanup: HashMap<String, Vec<String>>,
}

/// What the simulated machines did, for fault tests: agents started per
/// deployment, and reports the collector acknowledged per target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    pub agent_starts: BTreeMap<String, u32>,
    pub reports_acknowledged: BTreeMap<String, u64>,
    #[serde(default)]
    pub reports_sent: BTreeMap<String, u64>,
    #[serde(default)]
    pub reports_refused: BTreeMap<String, u64>,
    /// Per target, "seq N: STATUS detail" of each refusal (at most 4).
    #[serde(default)]
    pub report_refusals: BTreeMap<String, Vec<String>>,
    /// Per target, "seq N kind" of each report whose sending a cleanup cut
    /// short: the agent was stopped before the collector's answer reached it.
    #[serde(default)]
    pub reports_cut_by_cleanup: BTreeMap<String, Vec<String>>,
    pub running_agents: usize,
}

/// The simulated machines. Cheap to clone; clones share the fleet.
#[derive(Clone)]
pub struct SimFleet {
    options: Arc<SimOptions>,
    /// Agents run on the runtime the fleet was made on: they live on the
    /// "machines", not in the worker that started them.
    machines: tokio::runtime::Handle,
    http: reqwest::Client,
    state: Arc<Mutex<FleetState>>,
}

/// The `sim` transport over a [`SimFleet`].
#[derive(Clone)]
pub struct SimTransport {
    fleet: SimFleet,
}

impl SimTransport {
    pub fn new(fleet: SimFleet) -> Self {
        Self { fleet }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl SimFleet {
    /// Must be called within a tokio runtime: the simulated agents run on it.
    pub fn new(options: SimOptions) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64)
            .build()
            .expect("a plain HTTP client builds");
        Self { options: Arc::new(options), machines: tokio::runtime::Handle::current(), http, state: Arc::default() }
    }

    fn rng_for(&self, host: &str, salt: &str) -> rand::rngs::StdRng {
        let seed = self.options.seed ^ fnv1a(host.as_bytes()) ^ fnv1a(salt.as_bytes()).rotate_left(17);
        rand::rngs::StdRng::seed_from_u64(seed)
    }

    /// The behaviour of a host: its label, an override, or drawn from the seed.
    pub fn behaviour(&self, target: &TargetSpec) -> HostBehaviour {
        if let Some(label) = target.labels.get(HostBehaviour::LABEL) {
            if let Ok(behaviour) = serde_json::from_value(serde_json::Value::String(label.clone())) {
                return behaviour;
            }
        }
        if let Some(behaviour) = self.options.overrides.get(&target.host) {
            return *behaviour;
        }
        let roll: f64 = self.rng_for(&target.host, "behaviour").random();
        let o = &self.options;
        let mut edge = o.fail_rate;
        if roll < edge {
            return HostBehaviour::FailPatch;
        }
        edge += o.unreachable_rate;
        if roll < edge {
            return HostBehaviour::Unreachable;
        }
        edge += o.hang_rate;
        if roll < edge {
            return HostBehaviour::Hang;
        }
        edge += o.slow_patch_rate;
        if roll < edge {
            return HostBehaviour::SlowPatch;
        }
        HostBehaviour::Healthy
    }

    /// How many times an agent was really started for this deployment.
    pub fn agent_starts(&self, deployment_id: &str) -> u32 {
        self.state.lock().expect("sim fleet lock").starts.get(deployment_id).copied().unwrap_or(0)
    }

    /// Starts per deployment and acknowledged reports per target, so far.
    pub fn stats(&self) -> SimStats {
        let running_agents = self.running_agents();
        let state = self.state.lock().expect("sim fleet lock");
        SimStats {
            agent_starts: state.starts.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            reports_acknowledged: state.acknowledged.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            reports_sent: state.sent.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            reports_refused: state.refused.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            report_refusals: state.refusals.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            reports_cut_by_cleanup: state.cut_by_cleanup.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            running_agents,
        }
    }

    /// Agents that still run (a hung agent runs until cleanup).
    pub fn running_agents(&self) -> usize {
        let state = self.state.lock().expect("sim fleet lock");
        state.agents.values().filter(|slot| !slot.done.load(std::sync::atomic::Ordering::SeqCst)).count()
    }

    /// Records `patch_name` as installed on `host` (the probe then finds it).
    pub fn mark_installed(&self, host: &str, patch_name: &str) {
        let mut state = self.state.lock().expect("sim fleet lock");
        state.installed.entry(host.to_owned()).or_default().insert(patch_name.to_owned());
    }

    /// Whether this deployment's files are staged.
    pub fn is_staged(&self, deployment_id: &str) -> bool {
        self.state.lock().expect("sim fleet lock").staged.contains(deployment_id)
    }

    /// Deployments whose files are still staged on their host.
    pub fn staged_deployments(&self) -> usize {
        self.state.lock().expect("sim fleet lock").staged.len()
    }

    async fn step_latency(&self, target: &TargetSpec, step: &str) {
        let (min, max) = (self.options.min_latency_ms, self.options.max_latency_ms);
        let ms = if max > min { self.rng_for(&target.host, step).random_range(min..=max) } else { min };
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// The agent asked for a reboot: the host refuses its next
    /// [`SimOptions::reboot_contacts`] contacts and then answers on a new
    /// boot (a `no_return` host never answers again).
    fn reboot(&self, host: &str, behaviour: HostBehaviour) {
        let mut state = self.state.lock().expect("sim fleet lock");
        *state.boots.entry(host.to_owned()).or_default() += 1;
        if behaviour == HostBehaviour::NoReturn {
            state.gone.insert(host.to_owned());
        } else if self.options.reboot_contacts > 0 {
            state.rebooting.insert(host.to_owned(), self.options.reboot_contacts);
        }
    }

    /// The host's boot: changes with every reboot.
    fn boot_id(&self, host: &str) -> String {
        let boots = self.state.lock().expect("sim fleet lock").boots.get(host).copied().unwrap_or(0);
        format!("sim-boot-{boots}")
    }

    /// A rebooting host refuses the contact (and is one contact closer to
    /// being back); a `no_return` host that rebooted refuses every one.
    fn down_for_reboot(&self, host: &str) -> bool {
        let mut state = self.state.lock().expect("sim fleet lock");
        if state.gone.contains(host) {
            return true;
        }
        let Some(left) = state.rebooting.get_mut(host) else { return false };
        *left -= 1;
        if *left == 0 {
            state.rebooting.remove(host);
        }
        true
    }

    fn check_reachable(&self, target: &TargetSpec) -> Result<()> {
        if self.down_for_reboot(&target.host) {
            return Err(Error::Unreachable {
                address: target.address(),
                reason: "connection refused (simulated: rebooting)".into(),
            });
        }
        let refused = match self.behaviour(target) {
            HostBehaviour::Unreachable => true,
            HostBehaviour::ComesBack => {
                let mut state = self.state.lock().expect("sim fleet lock");
                let refused = state.refused_contacts.entry(target.host.clone()).or_default();
                let still_off = *refused < self.options.comes_back_after;
                if still_off {
                    *refused += 1;
                }
                still_off
            }
            _ => false,
        };
        if refused {
            return Err(Error::Unreachable {
                address: target.address(),
                reason: "connection refused (simulated)".into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::Transport for SimTransport {
    fn kind(&self) -> &'static str {
        "sim"
    }

    async fn reachable(&self, target: &TargetSpec) -> Result<()> {
        self.fleet.step_latency(target, "reachable").await;
        self.fleet.check_reachable(target)
    }

    async fn probe(&self, target: &TargetSpec, patches: &[PatchProbe]) -> Result<ProbeReport> {
        let fleet = &self.fleet;
        fleet.step_latency(target, "probe").await;
        fleet.check_reachable(target)?;
        let already = fleet.state.lock().expect("sim fleet lock").installed.get(&target.host).cloned();
        let installed = patches
            .iter()
            .filter(|patch| {
                already.as_ref().is_some_and(|set| set.contains(&patch.name))
                    || fleet.rng_for(&target.host, &patch.name).random::<f64>() < fleet.options.installed_rate
            })
            .map(|patch| patch.index)
            .collect();
        Ok(ProbeReport {
            os: "SimOS".into(),
            os_version: "1.0".into(),
            arch: "x86_64".into(),
            is_admin: true,
            installed,
            details: BTreeMap::from([("behaviour".into(), format!("{:?}", fleet.behaviour(target)))]),
            boot_id: Some(fleet.boot_id(&target.host)),
        })
    }

    async fn stage(&self, target: &TargetSpec, deployment: &Deployment) -> Result<()> {
        self.fleet.step_latency(target, "stage").await;
        self.fleet.check_reachable(target)?;
        self.fleet.state.lock().expect("sim fleet lock").staged.insert(deployment.id().to_owned());
        Ok(())
    }

    async fn start_agent(&self, target: &TargetSpec, deployment: &Deployment) -> Result<AgentStart> {
        let fleet = &self.fleet;
        fleet.check_reachable(target)?;
        let id = deployment.id().to_owned();
        let (cancel, done) = {
            let mut state = fleet.state.lock().expect("sim fleet lock");
            if !state.staged.contains(&id) {
                return Err(Error::Remote {
                    address: target.address(),
                    reason: format!("agent for deployment {id} is not staged"),
                    transient: false,
                });
            }
            if state.agents.contains_key(&id) {
                return Ok(AgentStart::AlreadyRunning);
            }
            let slot = AgentSlot { cancel: CancellationToken::new(), done: Arc::default() };
            let handles = (slot.cancel.clone(), slot.done.clone());
            state.agents.insert(id.clone(), slot);
            *state.starts.entry(id).or_default() += 1;
            handles
        };
        let agent = SimAgent {
            fleet: fleet.clone(),
            host: target.host.clone(),
            behaviour: fleet.behaviour(target),
            signing_key: SigningKey::from_token(&deployment.plan.token),
            plan: deployment.plan.clone(),
            seq: 0,
            // Never 0 (0 means "an agent older than the field").
            instance: rand::random::<u64>() | 1,
        };
        fleet.machines.spawn(async move {
            tokio::select! {
                _ = agent.run() => {}
                _ = cancel.cancelled() => {}
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // The service manager answers after the agent started: a worker that
        // dies now leaves a running agent behind, as on a real machine.
        fleet.step_latency(target, "start").await;
        Ok(AgentStart::Started)
    }

    async fn cleanup(&self, target: &TargetSpec, deployment_id: &str, keep_files: bool) -> Result<()> {
        self.fleet.step_latency(target, "cleanup").await;
        self.fleet.check_reachable(target)?;
        let mut state = self.fleet.state.lock().expect("sim fleet lock");
        if let Some(slot) = state.agents.remove(deployment_id) {
            slot.cancel.cancel();
        }
        // The agent stops now, also while it waits for the answer to a
        // report the collector may already have stored.
        if let Some((target_id, report)) = state.sending.remove(deployment_id) {
            state.cut_by_cleanup.entry(target_id).or_default().push(report);
        }
        if !keep_files {
            state.staged.remove(deployment_id);
        }
        Ok(())
    }

    async fn verify(&self, target: &TargetSpec, patches: &[PatchProbe]) -> Result<VerifyReport> {
        let probe = self.probe(target, patches).await?;
        let missing = patches.iter().map(|p| p.index).filter(|i| !probe.installed.contains(i)).collect();
        Ok(VerifyReport { installed: probe.installed, missing, unknown: vec![] })
    }
}

/// One simulated agent run.
struct SimAgent {
    fleet: SimFleet,
    host: String,
    behaviour: HostBehaviour,
    plan: DeploymentPlan,
    /// Derived from the plan's token; the token itself is never sent.
    signing_key: SigningKey,
    seq: u64,
    /// This agent run, stamped on its reports like the real agent's.
    instance: u64,
}

impl SimAgent {
    async fn run(mut self) {
        let heartbeat = Duration::from_secs(u64::from(self.plan.heartbeat_seconds.max(1)));
        let slow_index = self.plan.patches.first().map(|p| p.index);
        let mut all_ok = true;
        let mut reboot = false;
        for patch in self.plan.patches.clone() {
            self.send(Kind::Started(v1::PatchStarted { patch_index: patch.index })).await;
            if let Err((outcome, message)) = self.download(&patch).await {
                all_ok = false;
                self.send(Kind::Finished(v1::PatchFinished {
                    patch_index: patch.index,
                    exit_code: -1,
                    outcome: outcome as i32,
                    output_tail: format!("[simulated agent] {message}"),
                    duration_ms: 0,
                }))
                .await;
                continue;
            }
            if self.behaviour == HostBehaviour::Hang {
                std::future::pending::<()>().await;
            }
            let millis = if self.behaviour == HostBehaviour::SlowPatch && Some(patch.index) == slow_index {
                self.fleet.options.slow_patch_ms
            } else {
                self.fleet.options.patch_ms
            };
            let started = tokio::time::Instant::now();
            let until = started + Duration::from_millis(millis);
            loop {
                let next_beat = tokio::time::Instant::now() + heartbeat;
                if next_beat >= until {
                    tokio::time::sleep_until(until).await;
                    break;
                }
                tokio::time::sleep_until(next_beat).await;
                self.send(Kind::Heartbeat(v1::Heartbeat { patch_index: Some(patch.index) })).await;
            }
            let (exit_code, outcome) = match self.behaviour {
                HostBehaviour::FailPatch if Some(patch.index) == slow_index => (1603, v1::PatchOutcome::Failed),
                HostBehaviour::RebootRequired | HostBehaviour::NoReturn => {
                    (3010, v1::PatchOutcome::InstalledRebootRequired)
                }
                _ => (0, v1::PatchOutcome::Installed),
            };
            if outcome == v1::PatchOutcome::Failed {
                all_ok = false;
            } else {
                reboot |= outcome == v1::PatchOutcome::InstalledRebootRequired;
                let mut state = self.fleet.state.lock().expect("sim fleet lock");
                state.installed.entry(self.host.clone()).or_default().insert(patch.name.clone());
            }
            self.send(Kind::Finished(v1::PatchFinished {
                patch_index: patch.index,
                exit_code,
                outcome: outcome as i32,
                output_tail: format!("simulated installer for {} exited {exit_code}", patch.name),
                duration_ms: started.elapsed().as_millis() as u64,
            }))
            .await;
        }
        let message = if all_ok { "all patches installed" } else { "one or more patches failed" };
        self.send(Kind::Final(v1::FinalResult { success: all_ok, reboot_required: reboot, message: message.into() }))
            .await;
        // As the real agent: the reboot after the final report, when the
        // plan's policy says so.
        let reboot = match self.plan.reboot {
            RebootPolicy::Never => false,
            RebootPolicy::IfRequired => reboot,
            RebootPolicy::Always => true,
        };
        if reboot {
            self.fleet.reboot(&self.host, self.behaviour);
        }
    }

    /// Fetches an installer whose plan patch names sources (a relay), as the
    /// real agent does: over HTTP, checked against its sha256, so the demo's
    /// relays serve and count real bytes. A patch without sources was
    /// "staged" by the worker and needs nothing.
    async fn download(&self, patch: &PlanPatch) -> std::result::Result<(), (v1::PatchOutcome, String)> {
        use sha2::Digest;
        if patch.sources.is_empty() {
            return Ok(());
        }
        let mut last = String::new();
        for source in &patch.sources {
            let bytes = match self.fleet.http.get(source).send().await {
                Ok(response) if response.status().is_success() => response.bytes().await,
                Ok(response) => {
                    last = format!("{source} answered {}", response.status());
                    continue;
                }
                Err(error) => Err(error),
            };
            match bytes {
                Ok(bytes) => {
                    let actual = hex::encode(sha2::Sha256::digest(&bytes));
                    if actual == patch.sha256 {
                        return Ok(());
                    }
                    return Err((
                        v1::PatchOutcome::ChecksumMismatch,
                        format!(
                            "installer from {source}: sha256 is {actual}, the plan expects {}; not run",
                            patch.sha256
                        ),
                    ));
                }
                Err(error) => last = format!("{source}: {error}"),
            }
        }
        Err((v1::PatchOutcome::Failed, format!("could not download the installer: {last}")))
    }

    /// Posts one report, retrying with backoff until the collector takes it
    /// (the real agent also spools to disk; a simulated one keeps it in memory).
    async fn send(&mut self, kind: Kind) {
        self.seq += 1;
        let kind_name = match &kind {
            Kind::Started(_) => "started",
            Kind::Finished(_) => "finished",
            Kind::Heartbeat(_) => "heartbeat",
            Kind::Final(_) => "final",
        };
        {
            let mut state = self.fleet.state.lock().expect("sim fleet lock");
            *state.sent.entry(self.plan.target_id.to_string()).or_default() += 1;
            state.sending.insert(
                self.plan.deployment_id.clone(),
                (self.plan.target_id.to_string(), format!("seq {} {kind_name}", self.seq)),
            );
        }
        let batch = v1::ReportBatch {
            reports: vec![v1::AgentReport {
                seq: self.seq,
                sent_at_unix_ms: now_unix_ms(),
                agent_instance: self.instance,
                kind: Some(kind),
            }],
        };
        let body = batch.encode_to_vec();
        let path = format!("/v1/targets/{}/reports", self.plan.target_id);
        let url = format!("{}{path}", self.plan.collector_url.trim_end_matches('/'));
        let mut backoff = Duration::from_millis(100);
        loop {
            let sent = std::time::Instant::now();
            // Signed like the real agent's requests: a fresh nonce and time per try.
            let request = SignedRequest::new(
                "POST",
                &path,
                self.plan.target_id,
                self.plan.attempt,
                now_unix_ms(),
                rand::random(),
                &body,
            );
            let response = self
                .fleet
                .http
                .post(&url)
                .header("authorization", self.signing_key.authorization(&request))
                .header("content-type", "application/x-protobuf")
                .body(body.clone())
                .send()
                .await;
            match response {
                Ok(response) if response.status().is_success() => {
                    // What an agent waits for one report: the collector answers after its batch committed.
                    metrics::histogram!("fleetpatch_sim_report_seconds").record(sent.elapsed().as_secs_f64());
                    let mut state = self.fleet.state.lock().expect("sim fleet lock");
                    let target = self.plan.target_id.to_string();
                    *state.acknowledged.entry(target.clone()).or_default() += 1;
                    // A cleanup that took the lock first counted it as cut short; it was not.
                    if state.sending.remove(&self.plan.deployment_id).is_none() {
                        if let Some(cut) = state.cut_by_cleanup.get_mut(&target) {
                            cut.pop();
                        }
                    }
                    return;
                }
                // 408 (signed too long ago: it waited in a busy or frozen
                // collector) and 429 are retried, signed afresh, as the real
                // agent does.
                Ok(response)
                    if response.status().is_client_error() && !matches!(response.status().as_u16(), 408 | 429) =>
                {
                    let status = response.status();
                    let problem: serde_json::Value = response.json().await.unwrap_or_default();
                    let detail = problem["detail"].as_str().unwrap_or("(no problem detail)");
                    tracing::warn!(
                        status = %status,
                        seq = self.seq,
                        detail,
                        url = %fleetpatch_runtime::redact::url(&url),
                        "collector refused a simulated report"
                    );
                    let target = self.plan.target_id.to_string();
                    let mut state = self.fleet.state.lock().expect("sim fleet lock");
                    let refusals = state.refusals.entry(target.clone()).or_default();
                    if refusals.len() < 4 {
                        refusals.push(format!("seq {}: {status} {detail}", self.seq));
                    }
                    *state.refused.entry(target).or_default() += 1;
                    state.sending.remove(&self.plan.deployment_id);
                    return;
                }
                Ok(response) => tracing::debug!(status = %response.status(), "collector busy, retrying"),
                // Without its URL: the collector URL may carry a password.
                Err(error) => tracing::debug!(error = %error.without_url(), "collector unreachable, retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod option_tests {
    use super::*;

    #[test]
    fn bad_rates_and_latencies_name_the_key_and_the_value() {
        assert!(SimOptions::default().validate().is_ok());
        let error = SimOptions { hang_rate: 1.5, ..SimOptions::default() }.validate().unwrap_err().in_section("sim");
        assert_eq!(error.to_string(), "sim.hang_rate must be between 0 and 1, got 1.5");
        let error =
            SimOptions { fail_rate: 0.6, unreachable_rate: 0.6, ..SimOptions::default() }.validate().unwrap_err();
        assert!(error.to_string().ends_with("slow_patch_rate must not exceed 1"), "{error}");
        let error =
            SimOptions { min_latency_ms: 9, max_latency_ms: 2, ..SimOptions::default() }.validate().unwrap_err();
        assert_eq!(error.to_string(), "min_latency_ms (9) must not exceed max_latency_ms (2)");
    }
}

#[cfg(test)]
mod comes_back_tests {
    use super::*;
    use crate::Transport;

    #[tokio::test]
    async fn a_machine_that_comes_back_refuses_its_first_contacts_then_answers() {
        let fleet = SimFleet::new(SimOptions {
            comes_back_after: 2,
            min_latency_ms: 0,
            max_latency_ms: 0,
            ..SimOptions::default()
        });
        let transport = SimTransport::new(fleet);
        let target = TargetSpec {
            target_id: uuid::Uuid::new_v4(),
            host: "laptop-7".into(),
            port: None,
            labels: BTreeMap::from([(HostBehaviour::LABEL.to_owned(), "comes_back".to_owned())]),
            credential: None,
        };
        let error = transport.probe(&target, &[]).await.expect_err("switched off");
        assert!(error.is_transient(), "{error}");
        transport.reachable(&target).await.expect_err("still off");
        transport.reachable(&target).await.expect("back on");
        transport.probe(&target, &[]).await.expect("and stays on");
        let other = TargetSpec { host: "laptop-8".into(), ..target };
        transport.reachable(&other).await.expect_err("each machine counts its own contacts");
    }
}
