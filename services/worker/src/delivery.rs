//! How a deployment's installers reach its target, and the plan that says so.
//!
//! Without a relay the worker pushes every installer over the target's
//! transport (the admin share, SFTP), beside the agent and the plan. A
//! target whose labels select a relay (the rollout's `relays`, then
//! `worker.relays`; see [`fleetpatch_proto::relay::relay_for`]) gets only the
//! agent and the plan: each plan patch names the relay's
//! `…/v1/content/{sha256}` as its source, and the agent downloads it there,
//! checks its sha256 and resumes an interrupted download. So an installer
//! leaves the central content store once per relay instead of once per
//! target.
//!
//! Before it stages a pull, the worker asks the relay's `/readyz`. A relay
//! that does not answer is skipped: the installers are pushed as without a
//! relay, unless the rollout's `relay_fallback` is `fail`, in which case the
//! deployment is retried like an unreachable target. Either way the
//! target's `delivery` says what happened and why.

use std::sync::Arc;
use std::time::Duration;

use fleetpatch_proto::plan::{self, DeploymentPlan, PlanPatch};
use fleetpatch_proto::relay::{relay_for, RelayFallback, RelayRule};
use fleetpatch_store::{content, DeployContext};
use fleetpatch_transport::{Deployment, StagedFile};

use crate::{agent_binary_key, Error, StepError, Worker};

/// How one deployment's installers reach the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Staged by the worker over the transport (no relay for this target).
    Push,
    /// Downloaded by the agent from this relay.
    Pull(RelayRule),
    /// The target has a relay, but it did not answer: pushed instead.
    PushAfterRelayFailure { url: String, reason: String },
}

impl Delivery {
    /// What the target shows as its `delivery`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Delivery::Push => "push".to_owned(),
            Delivery::Pull(relay) => format!("relay {}", relay.base_url()),
            Delivery::PushAfterRelayFailure { url, reason } => {
                format!("push: relay {url} did not answer the worker ({reason})")
            }
        }
    }

    fn metric_label(&self) -> &'static str {
        match self {
            Delivery::Push => "push",
            Delivery::Pull(_) => "relay",
            Delivery::PushAfterRelayFailure { .. } => "push_after_relay_failure",
        }
    }
}

/// Asks relays whether they serve (`GET /readyz`).
#[derive(Clone)]
pub(crate) struct RelayCheck {
    http: reqwest::Client,
    /// The CA an `https://` relay's certificate chains to; it also goes into
    /// every plan with a relay, for the agent.
    pub(crate) ca_pem: Option<Arc<str>>,
}

impl RelayCheck {
    pub(crate) fn new(ca_pem: Option<Arc<str>>, timeout: Duration) -> Result<Self, Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = &ca_pem {
            let certificate = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|error| Error::RelayCa { reason: format!("not a PEM certificate: {error}") })?;
            builder = builder.tls_built_in_root_certs(false).add_root_certificate(certificate);
        }
        let http = builder.build().map_err(|error| Error::RelayCa { reason: error.to_string() })?;
        Ok(Self { http, ca_pem })
    }

    /// `Ok` when the relay answers `/readyz` with 200; why not otherwise.
    pub(crate) async fn check(&self, relay: &RelayRule) -> Result<(), RelayDown> {
        let url = format!("{}/readyz", relay.base_url());
        match self.http.get(&url).send().await {
            Ok(response) if response.status().is_success() => Ok(()),
            Ok(response) => Err(RelayDown::NotReady(response.status())),
            Err(error) if error.is_timeout() => Err(RelayDown::Timeout),
            Err(error) if error.is_connect() => Err(RelayDown::Unreachable),
            Err(error) => Err(RelayDown::Other(without_url(&error))),
        }
    }
}

/// Why a relay is not used for a deployment (shown on the target).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayDown {
    #[error("/readyz answered {0}")]
    NotReady(reqwest::StatusCode),
    #[error("no answer in time")]
    Timeout,
    #[error("connection refused or unreachable")]
    Unreachable,
    #[error("{0}")]
    Other(String),
}

/// A reqwest error's message without its URL (the caller names the relay).
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(&format!(" ({url})"), "").replace(url.as_str(), "the relay");
    }
    text
}

impl Worker {
    /// Which way this target's installers go, asking its relay first when it has one.
    pub(crate) async fn choose_delivery(&self, context: &DeployContext) -> Result<Delivery, StepError> {
        let settings = &context.rollout.settings;
        let Some(relay) = relay_for(&settings.relays, &self.options.relays, &context.target.labels) else {
            return Ok(self.counted(Delivery::Push));
        };
        if relay.url.starts_with("https://") && self.relay_check.ca_pem.is_none() {
            // The agent trusts only the CA the plan carries: with none, it
            // would refuse the plan and the target would time out instead.
            return Err(StepError::Permanent(format!(
                "the target's relay {} is https, and this worker has no worker.relay_ca_file for the agent to \
                 trust its certificate with; set it, or use an http:// relay",
                relay.base_url()
            )));
        }
        match self.relay_check.check(relay).await {
            Ok(()) => Ok(self.counted(Delivery::Pull(relay.clone()))),
            Err(reason) if settings.relay_fallback == RelayFallback::Push => {
                tracing::warn!(
                    target_id = %context.target.id,
                    relay = relay.base_url(),
                    reason = %reason,
                    "relay did not answer; pushing the installers"
                );
                let reason = reason.to_string();
                Ok(self.counted(Delivery::PushAfterRelayFailure { url: relay.base_url().to_owned(), reason }))
            }
            Err(reason) => {
                metrics::counter!("fleetpatch_worker_deliveries_total", "delivery" => "relay_unreachable").increment(1);
                Err(StepError::Transport(fleetpatch_transport::Error::Remote {
                    address: relay.base_url().to_owned(),
                    reason: format!(
                        "the target's relay did not answer ({reason}), and the rollout's relay_fallback is \
                         fail: the installers are not pushed"
                    ),
                    transient: true,
                }))
            }
        }
    }

    fn counted(&self, delivery: Delivery) -> Delivery {
        metrics::counter!("fleetpatch_worker_deliveries_total", "delivery" => delivery.metric_label()).increment(1);
        delivery
    }

    /// The files to stage and the plan for this target's attempt.
    pub(crate) fn deployment(
        &self,
        context: &DeployContext,
        probe: &fleetpatch_transport::ProbeReport,
        token: String,
        transport: &str,
        delivery: &Delivery,
    ) -> Result<Deployment, StepError> {
        let target = &context.target;
        let settings = &context.rollout.settings;
        let wanted: Vec<_> = context.patches.iter().filter(|p| !probe.installed.contains(&p.index)).collect();
        let needs_bytes = transport != "sim";
        let relay = match delivery {
            Delivery::Pull(relay) => Some(relay),
            Delivery::Push | Delivery::PushAfterRelayFailure { .. } => None,
        };
        let mut files = Vec::new();
        if relay.is_none() {
            for patch in &wanted {
                let source = content::path_of(&self.options.content_dir, &patch.sha256);
                if needs_bytes && !source.exists() {
                    return Err(StepError::Permanent(format!(
                        "installer of patch {:?} (sha256 {}) is not in the content store; upload it with PUT /v1/content/{}",
                        patch.name, patch.sha256, patch.sha256
                    )));
                }
                files.push(StagedFile {
                    name: patch.file.clone(),
                    source,
                    sha256: patch.sha256.clone(),
                    size: patch.size,
                });
            }
        }
        let agent_binary = if needs_bytes {
            let key = agent_binary_key(&probe.os, &probe.arch);
            Some(self.options.agent_binaries.get(&key).cloned().ok_or_else(|| {
                StepError::Permanent(format!(
                    "no agent binary for {} on {:?}; set worker.agent_binaries.{key}",
                    probe.os, probe.arch
                ))
            })?)
        } else {
            None
        };
        let plan = DeploymentPlan {
            version: plan::PLAN_VERSION,
            deployment_id: plan::deployment_id(target.id, target.attempt),
            target_id: target.id,
            attempt: target.attempt,
            collector_url: self.options.collector_url.clone(),
            collector_ca_pem: self.collector_ca_pem.as_deref().map(str::to_owned),
            token,
            heartbeat_seconds: settings.heartbeat_seconds,
            patches: wanted
                .iter()
                .map(|p| PlanPatch {
                    index: p.index,
                    name: p.name.clone(),
                    file: p.file.clone(),
                    sha256: p.sha256.clone(),
                    size: p.size,
                    sources: relay.map(|relay| vec![relay.content_url(&p.sha256)]).unwrap_or_default(),
                    installer: p.installer,
                    arguments: p.arguments.clone(),
                    success_codes: p.success_codes.clone(),
                    reboot_codes: p.reboot_codes.clone(),
                    timeout_seconds: p.timeout_seconds,
                })
                .collect(),
            reboot: settings.reboot,
            reboot_command: if probe.os.eq_ignore_ascii_case("windows") {
                self.options.windows_reboot_command.clone()
            } else {
                self.options.unix_reboot_command.clone()
            },
            keep_files: settings.keep_files,
            relay_ca_pem: relay.and(self.relay_check.ca_pem.as_deref()).map(str::to_owned),
            download_timeout_seconds: self.options.relay_download_timeout_seconds,
        };
        Ok(Deployment { plan, agent_binary, files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_shows_how_its_installers_came() {
        assert_eq!(Delivery::Push.describe(), "push");
        let relay = RelayRule { selector: "site=paris".into(), url: "http://relay-paris:1073/".into() };
        assert_eq!(Delivery::Pull(relay).describe(), "relay http://relay-paris:1073");
        let fallback = Delivery::PushAfterRelayFailure {
            url: "http://relay-paris:1073".into(),
            reason: "connection refused or unreachable".into(),
        };
        assert_eq!(
            fallback.describe(),
            "push: relay http://relay-paris:1073 did not answer the worker (connection refused or unreachable)"
        );
    }
}
