//! The client commands (`rollout …`, `targets`, `target`, `audit`): their
//! arguments, their exit codes, and how a failure is told to the user.
//!
//! Each command talks to the scheduler only through [`ApiClient`]; none of
//! them touches the database or the bus.

mod audit;
mod dead_letters;
mod evidence;
mod rollout;
mod targets;
mod watch;

use std::path::PathBuf;

use clap::{Args, Subcommand};
use fleetpatch_proto::state::TargetState;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::client::{ApiClient, ClientError, DEFAULT_API_URL};
use crate::exit::{self, Failure};
use crate::output::OutputFormat;
use crate::rollout_file::InputError;

/// The client's section of the configuration file (`[client]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientOptions {
    /// The scheduler API; `--api` and `FLEETPATCH_API` override it.
    pub api_url: String,
    /// Where the API credential is: a secret reference (`env:NAME`,
    /// `file:/path`), never the key itself; `--token` and
    /// `FLEETPATCH_TOKEN` override it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self { api_url: DEFAULT_API_URL.into(), token: None }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The scheduler API [default: client.api_url of the configuration, else http://127.0.0.1:8080]
    #[arg(long, env = "FLEETPATCH_API", value_name = "URL")]
    api: Option<String>,
    /// The API key (fpk_…) or OIDC token to send [default: the secret client.token refers to]
    #[arg(long, env = "FLEETPATCH_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ApiArgs {
    /// The client these arguments and the configuration describe.
    pub fn client(&self, options: &ClientOptions) -> Result<ApiClient, Failure> {
        let token = match (&self.token, &options.token) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(reference)) => Some(
                fleetpatch_runtime::secrets::resolve(reference)
                    .map_err(|reason| Failure::new(exit::USAGE, format!("client.token: {reason}")))?,
            ),
            (None, None) => None,
        };
        let token = token.filter(|t| !t.trim().is_empty());
        ApiClient::new(self.api.as_deref().unwrap_or(&options.api_url), token.as_deref()).map_err(Failure::from)
    }
}

#[derive(Debug, Clone, Copy, Args)]
pub struct OutputArgs {
    /// `table` for people, `json` for scripts (the API's documents).
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Create a rollout from a YAML file (the schema of POST /v1/rollouts).
    Create(CreateArgs),
    /// List the latest rollouts.
    List {
        /// At most this many rollouts, newest first.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a rollout: its state, progress per wave and patches.
    Show {
        id: Uuid,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Redraw a rollout's progress per wave until it completes, is paused or aborted.
    ///
    /// Exit status: 0 when every target succeeded, 5 when it completed with
    /// failures, 6 when it is paused, 7 when it was aborted.
    Watch(WatchArgs),
    /// Dispatch nothing new (targets in flight finish).
    Pause {
        id: Uuid,
        /// Why; shown with the rollout.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Continue a paused rollout (with the next wave after a threshold halt).
    Resume {
        id: Uuid,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Start the next wave of a rollout waiting in awaiting_approval (recorded in the audit log).
    Approve {
        id: Uuid,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The evidence report of a rollout: per target and patch, the state, exit code, timings and
    /// verification; who created, approved, paused or aborted it (audit log); the timeline. The API
    /// stores the report's sha256, so a copy can be checked later with `rollout verify-report`.
    Report {
        id: Uuid,
        /// `html` (one self-contained file with a chart), `csv` (a row per target and patch) or `json`.
        #[arg(long, default_value = "html", value_parser = ["html", "csv", "json"])]
        format: String,
        /// Write the report to this file instead of stdout.
        #[arg(long)]
        save: Option<std::path::PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Check that a report file is, byte for byte, one this fleetpatch issued.
    VerifyReport {
        file: std::path::PathBuf,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Stop a rollout: targets not yet dispatched are cancelled.
    Abort {
        id: Uuid,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Give every failed and timed-out target a new attempt.
    RetryFailed {
        id: Uuid,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The rollout file (YAML or JSON); see docs/rollout-file.md.
    #[arg(long, short = 'f', value_name = "FILE")]
    file: PathBuf,
    /// Add the targets of a CSV file (header: host,transport,port,credential,wave,<labels>…).
    #[arg(long, value_name = "FILE")]
    targets_csv: Vec<PathBuf>,
    /// Add the hosts of an Ansible-style INI inventory (groups become the label `group`).
    #[arg(long, value_name = "FILE")]
    inventory: Vec<PathBuf>,
    /// Transport of imported targets that name none [default: sim for CSV, ssh for an inventory]
    #[arg(long, value_parser = ["sim", "ssh", "smb"])]
    transport: Option<String>,
    /// Check the files and print the request as JSON; send nothing.
    #[arg(long)]
    dry_run: bool,
    /// Watch the new rollout (exit status as for `rollout watch`).
    #[arg(long, conflicts_with = "dry_run")]
    watch: bool,
    /// Run `fleetpatch check` on every target first; create nothing when a check fails (exit status 8).
    #[arg(long)]
    preflight: bool,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    id: Uuid,
    /// Seconds between two looks at the rollout.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    interval: f64,
    /// `json` prints one line (the rollout document) per change.
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct TargetsArgs {
    /// The rollout.
    id: Uuid,
    /// Only targets in this state.
    #[arg(long, value_parser = parse_target_state)]
    state: Option<TargetState>,
    /// At most this many targets (all when left out).
    #[arg(long)]
    limit: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    /// The target.
    id: Uuid,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only the calls about this rollout.
    #[arg(long)]
    rollout: Option<Uuid>,
    /// At most this many entries, newest first (all when left out).
    #[arg(long)]
    limit: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    api: ApiArgs,
}

/// `dead-letters list|replay`.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// The oldest dead letters, left in the queue: the work queue each was for and why it died.
    List {
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: u64,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Move dead letters back to their work queues (operator); safe to repeat.
    Replay {
        /// At most this many, oldest first (all, up to 10,000, when left out).
        #[arg(long)]
        limit: Option<u64>,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
}

fn parse_target_state(raw: &str) -> Result<TargetState, fleetpatch_proto::state::UnknownState> {
    raw.parse()
}

/// A client command: what `main` hands over.
#[derive(Debug)]
pub enum ClientCommand {
    Rollout(RolloutCommand),
    Targets(TargetsArgs),
    Target(TargetArgs),
    Audit(AuditArgs),
    DeadLetters(DeadLettersCommand),
}

impl From<InputError> for Failure {
    fn from(error: InputError) -> Self {
        Failure::new(exit::INVALID, error.to_string())
    }
}

impl From<ClientError> for Failure {
    fn from(error: ClientError) -> Self {
        let code = match &error {
            ClientError::Refused { .. } => exit::INVALID,
            ClientError::Unauthenticated { .. } => exit::UNAUTHENTICATED,
            ClientError::Forbidden { .. } => exit::FORBIDDEN,
            ClientError::BadUrl { .. } | ClientError::BadToken => exit::USAGE,
            ClientError::Unreachable { .. } | ClientError::Unavailable { .. } => exit::UNREACHABLE,
            ClientError::Protocol { .. } => exit::ERROR,
        };
        let message = match &error {
            ClientError::Refused { problem, .. } if !problem.errors.is_empty() => refused_fields(problem, |_| None),
            other => other.to_string(),
        };
        Failure::new(code, message)
    }
}

/// "the API refused the request (invalid request):" and one line per
/// wrong field, each followed by where the user wrote it when known.
pub fn refused_fields<'a>(problem: &crate::client::Problem, origin_of: impl Fn(&str) -> Option<&'a str>) -> String {
    let title = if problem.title.is_empty() { "refused".to_owned() } else { problem.title.to_lowercase() };
    let mut message = format!("the API refused the request ({title}):");
    for field in &problem.errors {
        message.push_str(&format!("\n  {}: {}", field.field, field.message));
        if let Some(origin) = origin_of(&field.field) {
            message.push_str(&format!(" ({origin})"));
        }
    }
    message
}

/// Runs a client command; returns the exit status.
pub async fn run(
    command: ClientCommand,
    options: &crate::commands::ClientOptions,
    environment: &crate::check::Environment,
) -> Result<u8, Failure> {
    let client = |api: &ApiArgs| api.client(options);
    match command {
        ClientCommand::Rollout(command) => match command {
            RolloutCommand::Create(args) => {
                let api = client(&args.api)?;
                rollout::create(&api, args, environment).await
            }
            RolloutCommand::List { limit, output, api } => rollout::list(&client(&api)?, limit, output.output).await,
            RolloutCommand::Show { id, output, api } => rollout::show(&client(&api)?, id, output.output).await,
            RolloutCommand::Watch(args) => {
                let api = client(&args.api)?;
                let interval = std::time::Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
                watch::watch(&api, args.id, interval, args.output.output).await
            }
            RolloutCommand::Pause { id, reason, output, api } => {
                rollout::act(&client(&api)?, id, crate::client::RolloutAction::Pause, reason, output.output).await
            }
            RolloutCommand::Resume { id, output, api } => {
                rollout::act(&client(&api)?, id, crate::client::RolloutAction::Resume, None, output.output).await
            }
            RolloutCommand::Approve { id, output, api } => {
                rollout::act(&client(&api)?, id, crate::client::RolloutAction::Approve, None, output.output).await
            }
            RolloutCommand::Report { id, format, save, api } => {
                evidence::report(&client(&api)?, id, &format, save.as_deref()).await
            }
            RolloutCommand::VerifyReport { file, output, api } => {
                evidence::verify_report(&client(&api)?, &file, output.output).await
            }
            RolloutCommand::Abort { id, output, api } => {
                rollout::act(&client(&api)?, id, crate::client::RolloutAction::Abort, None, output.output).await
            }
            RolloutCommand::RetryFailed { id, output, api } => {
                rollout::act(&client(&api)?, id, crate::client::RolloutAction::RetryFailed, None, output.output).await
            }
        },
        ClientCommand::Targets(args) => {
            let api = client(&args.api)?;
            targets::list(&api, args.id, args.state, args.limit, args.output.output).await
        }
        ClientCommand::Target(args) => targets::show(&client(&args.api)?, args.id, args.output.output).await,
        ClientCommand::Audit(args) => {
            audit::list(&client(&args.api)?, args.rollout, args.limit, args.output.output).await
        }
        ClientCommand::DeadLetters(DeadLettersCommand::List { limit, output, api }) => {
            dead_letters::list(&client(&api)?, limit, output.output).await
        }
        ClientCommand::DeadLetters(DeadLettersCommand::Replay { limit, output, api }) => {
            dead_letters::replay(&client(&api)?, limit, output.output).await
        }
    }
}
