//! The simulated fleet in a process of its own (`fleetpatch sim-fleet`),
//! which workers reach over loopback HTTP: killing a worker then leaves the
//! agents it started running, as on real machines, and the next worker that
//! takes a deployment over asks the "machine" whether its agent already
//! started. The fault tests (`chaos`) run it this way; the demo and the
//! in-process tests keep [`SimTransport`](crate::sim::SimTransport) directly.
//!
//! The wire carries only what a simulated machine needs (host, port,
//! labels, the plan); never a credential. [`serve_op`] is the server side,
//! written once here and mounted by the CLI; [`RemoteSimTransport`] is the
//! client, the `sim` transport of a worker whose `sim.fleet_url` is set.

use std::collections::BTreeMap;
use std::time::Duration;

use fleetpatch_proto::plan::DeploymentPlan;
use serde::{Deserialize, Serialize};

use crate::sim::{SimFleet, SimTransport};
use crate::{AgentStart, Deployment, Error, PatchProbe, ProbeReport, Result, TargetSpec, Transport, VerifyReport};

/// A target as the simulated machine sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireTarget {
    pub target_id: uuid::Uuid,
    pub host: String,
    pub port: Option<u16>,
    pub labels: BTreeMap<String, String>,
}

impl WireTarget {
    fn of(target: &TargetSpec) -> Self {
        Self {
            target_id: target.target_id,
            host: target.host.clone(),
            port: target.port,
            labels: target.labels.clone(),
        }
    }

    fn spec(self) -> TargetSpec {
        TargetSpec {
            target_id: self.target_id,
            host: self.host,
            port: self.port,
            labels: self.labels,
            credential: None,
        }
    }
}

/// One request to the fleet process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SimRequest {
    Probe { target: WireTarget, patches: Vec<(u32, String)> },
    Stage { target: WireTarget, plan: DeploymentPlan },
    StartAgent { target: WireTarget, plan: DeploymentPlan },
    Cleanup { target: WireTarget, deployment_id: String, keep_files: bool },
    Verify { target: WireTarget, patches: Vec<(u32, String)> },
    Reachable { target: WireTarget },
}

/// The answer to a [`SimRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimAnswer {
    Probe(ProbeReport),
    Done,
    Started { already_running: bool },
    Verify(VerifyReport),
    Failed { unreachable: bool, transient: bool, message: String },
}

fn probes(patches: Vec<(u32, String)>) -> Vec<PatchProbe> {
    patches.into_iter().map(|(index, name)| PatchProbe { index, name, detection: None }).collect()
}

fn deployment(plan: DeploymentPlan) -> Deployment {
    Deployment { plan, agent_binary: None, files: vec![] }
}

fn failed(error: Error) -> SimAnswer {
    SimAnswer::Failed {
        unreachable: matches!(error, Error::Unreachable { .. }),
        transient: error.is_transient(),
        message: error.to_string(),
    }
}

/// Runs one request against the fleet (the server side of the wire).
pub async fn serve_op(fleet: &SimFleet, request: SimRequest) -> SimAnswer {
    let transport = SimTransport::new(fleet.clone());
    let answer = match request {
        SimRequest::Probe { target, patches } => {
            transport.probe(&target.spec(), &probes(patches)).await.map(SimAnswer::Probe)
        }
        SimRequest::Stage { target, plan } => {
            transport.stage(&target.spec(), &deployment(plan)).await.map(|()| SimAnswer::Done)
        }
        SimRequest::StartAgent { target, plan } => transport
            .start_agent(&target.spec(), &deployment(plan))
            .await
            .map(|start| SimAnswer::Started { already_running: start == AgentStart::AlreadyRunning }),
        SimRequest::Cleanup { target, deployment_id, keep_files } => {
            transport.cleanup(&target.spec(), &deployment_id, keep_files).await.map(|()| SimAnswer::Done)
        }
        SimRequest::Verify { target, patches } => {
            transport.verify(&target.spec(), &probes(patches)).await.map(SimAnswer::Verify)
        }
        SimRequest::Reachable { target } => transport.reachable(&target.spec()).await.map(|()| SimAnswer::Done),
    };
    answer.unwrap_or_else(failed)
}

async fn op(
    axum::extract::State(fleet): axum::extract::State<SimFleet>,
    axum::Json(request): axum::Json<SimRequest>,
) -> axum::Json<SimAnswer> {
    axum::Json(serve_op(&fleet, request).await)
}

async fn stats(axum::extract::State(fleet): axum::extract::State<SimFleet>) -> axum::Json<crate::sim::SimStats> {
    axum::Json(fleet.stats())
}

/// The fleet process's routes: `POST /v1/sim` (one [`SimRequest`]) and
/// `GET /v1/sim/stats` (agents started per deployment, reports
/// acknowledged per target).
pub fn router(fleet: SimFleet) -> axum::Router {
    axum::Router::new()
        .route("/v1/sim", axum::routing::post(op))
        .route("/v1/sim/stats", axum::routing::get(stats))
        .with_state(fleet)
}

/// The `sim` transport of a worker whose simulated fleet runs in another
/// process (`sim.fleet_url`).
#[derive(Clone)]
pub struct RemoteSimTransport {
    url: String,
    http: reqwest::Client,
}

impl RemoteSimTransport {
    /// `url`: the fleet process's base URL (`http://127.0.0.1:PORT`).
    pub fn new(url: &str) -> Self {
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("a plain HTTP client builds");
        Self { url: format!("{}/v1/sim", url.trim_end_matches('/')), http }
    }

    async fn call(&self, target: &TargetSpec, request: SimRequest) -> Result<SimAnswer> {
        let unreachable = |reason: String| Error::Unreachable { address: target.address(), reason };
        let response =
            self.http.post(&self.url).json(&request).send().await.map_err(|error| {
                unreachable(format!("the simulated fleet at {} does not answer: {error}", self.url))
            })?;
        if !response.status().is_success() {
            return Err(unreachable(format!("the simulated fleet answered {}", response.status())));
        }
        let answer: SimAnswer = response
            .json()
            .await
            .map_err(|error| unreachable(format!("the simulated fleet's answer is not readable: {error}")))?;
        match answer {
            SimAnswer::Failed { unreachable: true, message, .. } => {
                Err(Error::Unreachable { address: target.address(), reason: message })
            }
            SimAnswer::Failed { transient, message, .. } => {
                Err(Error::Remote { address: target.address(), reason: message, transient })
            }
            other => Ok(other),
        }
    }
}

fn wire_patches(patches: &[PatchProbe]) -> Vec<(u32, String)> {
    patches.iter().map(|p| (p.index, p.name.clone())).collect()
}

fn unexpected(target: &TargetSpec, answer: SimAnswer) -> Error {
    Error::Remote { address: target.address(), reason: format!("unexpected answer {answer:?}"), transient: false }
}

#[async_trait::async_trait]
impl Transport for RemoteSimTransport {
    fn kind(&self) -> &'static str {
        "sim"
    }

    async fn probe(&self, target: &TargetSpec, patches: &[PatchProbe]) -> Result<ProbeReport> {
        let request = SimRequest::Probe { target: WireTarget::of(target), patches: wire_patches(patches) };
        match self.call(target, request).await? {
            SimAnswer::Probe(report) => Ok(report),
            other => Err(unexpected(target, other)),
        }
    }

    async fn stage(&self, target: &TargetSpec, deployment: &Deployment) -> Result<()> {
        let request = SimRequest::Stage { target: WireTarget::of(target), plan: deployment.plan.clone() };
        match self.call(target, request).await? {
            SimAnswer::Done => Ok(()),
            other => Err(unexpected(target, other)),
        }
    }

    async fn start_agent(&self, target: &TargetSpec, deployment: &Deployment) -> Result<AgentStart> {
        let request = SimRequest::StartAgent { target: WireTarget::of(target), plan: deployment.plan.clone() };
        match self.call(target, request).await? {
            SimAnswer::Started { already_running: false } => Ok(AgentStart::Started),
            SimAnswer::Started { already_running: true } => Ok(AgentStart::AlreadyRunning),
            other => Err(unexpected(target, other)),
        }
    }

    async fn cleanup(&self, target: &TargetSpec, deployment_id: &str, keep_files: bool) -> Result<()> {
        let request =
            SimRequest::Cleanup { target: WireTarget::of(target), deployment_id: deployment_id.to_owned(), keep_files };
        match self.call(target, request).await? {
            SimAnswer::Done => Ok(()),
            other => Err(unexpected(target, other)),
        }
    }

    async fn verify(&self, target: &TargetSpec, patches: &[PatchProbe]) -> Result<VerifyReport> {
        let request = SimRequest::Verify { target: WireTarget::of(target), patches: wire_patches(patches) };
        match self.call(target, request).await? {
            SimAnswer::Verify(report) => Ok(report),
            other => Err(unexpected(target, other)),
        }
    }

    async fn reachable(&self, target: &TargetSpec) -> Result<()> {
        match self.call(target, SimRequest::Reachable { target: WireTarget::of(target) }).await? {
            SimAnswer::Done => Ok(()),
            other => Err(unexpected(target, other)),
        }
    }
}
