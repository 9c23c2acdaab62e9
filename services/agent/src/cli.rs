//! The command line, parsed by hand: three subcommands and a handful of
//! options do not justify a CLI framework in a binary that is copied to
//! every target (clap alone would add several hundred KiB).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::Error;

/// Default time to wait for unacknowledged reports before exiting.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(600);
/// Default first retry delay after a failed delivery.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Default longest retry delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Default connect and read/write timeout of one request.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Default reboot command.
#[cfg(windows)]
pub const DEFAULT_REBOOT_COMMAND: &str = "shutdown /r /t 60";
/// Default reboot command.
#[cfg(not(windows))]
pub const DEFAULT_REBOOT_COMMAND: &str = "shutdown -r +1";

pub const USAGE: &str = "\
fleetpatch-agent: installs the patches of a deployment plan and reports to the collector

USAGE:
    fleetpatch-agent run   --plan DIR/plan.json [OPTIONS]   install the patches, report, post-actions
    fleetpatch-agent drain --plan DIR/plan.json [OPTIONS]   only deliver reports left in the spool
    fleetpatch-agent check --plan DIR/plan.json             validate the plan and exit
    fleetpatch-agent service --plan DIR/plan.json [OPTIONS] Windows only: `run`, as a service the
                                                            service control manager started
    fleetpatch-agent --help | --version

OPTIONS:
    --spool FILE                    report spool (default: spool.bin beside the plan)
    --log FILE                      also append log lines to FILE (stderr always)
    --reboot-command CMD            run through the shell when the plan's reboot policy says so
                                    (default: \"shutdown -r +1\"; Windows: \"shutdown /r /t 60\")
    --drain-deadline-seconds N      wait at most N s for reports to be acknowledged (default 600)
    --retry-initial-ms N            first retry delay when the collector is unreachable (default 500)
    --retry-max-ms N                longest retry delay (default 30000)
    --http-timeout-seconds N        connect and read/write timeout per request (default 30)
    --detach PIDFILE                `run` on Unix: the agent forks into a session of its own (setsid),
                                    ignores hang-ups and writes its pid to PIDFILE; the command exits 0
                                    once the pid is written (1 if the agent could not start)

EXIT CODES:
    0  done, every report acknowledged (patch failures are reported, not exit codes)
    1  the plan or the spool could not be used (the message names the field or file)
    2  bad command line
    3  done, but some reports are still in the spool (collector unreachable or token refused)
";

/// Options of `run` and `drain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    pub plan_path: PathBuf,
    pub spool_path: Option<PathBuf>,
    pub log_path: Option<PathBuf>,
    pub reboot_command: String,
    pub drain_deadline: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub http_timeout: Duration,
    /// `run --detach PIDFILE` (Unix): see [`crate::detach`].
    pub detach: Option<PathBuf>,
}

impl RunOptions {
    pub fn new(plan_path: PathBuf) -> Self {
        Self {
            plan_path,
            spool_path: None,
            log_path: None,
            reboot_command: DEFAULT_REBOOT_COMMAND.to_owned(),
            drain_deadline: DEFAULT_DRAIN_DEADLINE,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            http_timeout: DEFAULT_HTTP_TIMEOUT,
            detach: None,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    Run(RunOptions),
    Drain(RunOptions),
    /// `run` under the Windows service control manager (the `smb`
    /// transport's agent service).
    Service(RunOptions),
    Check {
        plan_path: PathBuf,
    },
    Help,
    Version,
}

fn usage(message: impl Into<String>) -> Error {
    Error::Usage(message.into())
}

/// Parse the arguments after the program name.
pub fn parse(arguments: impl IntoIterator<Item = OsString>) -> Result<Invocation, Error> {
    let mut arguments = arguments.into_iter();
    let subcommand = match arguments.next() {
        None => return Err(usage("missing subcommand (run, drain, check or service)")),
        Some(argument) => argument.into_string().map_err(|_| usage("the subcommand is not valid UTF-8"))?,
    };
    match subcommand.as_str() {
        "-h" | "--help" | "help" => return Ok(Invocation::Help),
        "-V" | "--version" | "version" => return Ok(Invocation::Version),
        "run" | "drain" | "check" | "service" => {}
        other => return Err(usage(format!("unknown subcommand {other:?} (expected run, drain, check or service)"))),
    }

    let mut plan_path = None;
    let mut options = RunOptions::new(PathBuf::new());
    while let Some(argument) = arguments.next() {
        let argument = argument.into_string().map_err(|raw| usage(format!("{raw:?} is not valid UTF-8")))?;
        if argument == "-h" || argument == "--help" {
            return Ok(Invocation::Help);
        }
        let (name, inline_value) = match argument.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_owned(), Some(OsString::from(value))),
            _ => (argument.clone(), None),
        };
        let mut value = || -> Result<OsString, Error> {
            inline_value.clone().or_else(|| arguments.next()).ok_or_else(|| usage(format!("{name} needs a value")))
        };
        match name.as_str() {
            "--plan" => plan_path = Some(PathBuf::from(value()?)),
            "--spool" if subcommand != "check" => options.spool_path = Some(PathBuf::from(value()?)),
            "--log" if subcommand != "check" => options.log_path = Some(PathBuf::from(value()?)),
            "--reboot-command" if subcommand != "check" => {
                options.reboot_command =
                    value()?.into_string().map_err(|_| usage("--reboot-command is not valid UTF-8"))?;
                if options.reboot_command.trim().is_empty() {
                    return Err(usage("--reboot-command must not be empty"));
                }
            }
            "--drain-deadline-seconds" if subcommand != "check" => {
                options.drain_deadline = Duration::from_secs(number(&name, value()?)?);
            }
            "--retry-initial-ms" if subcommand != "check" => {
                options.backoff_initial = Duration::from_millis(number(&name, value()?)?.max(1));
            }
            "--retry-max-ms" if subcommand != "check" => {
                options.backoff_max = Duration::from_millis(number(&name, value()?)?.max(1));
            }
            "--http-timeout-seconds" if subcommand != "check" => {
                options.http_timeout = Duration::from_secs(number(&name, value()?)?.max(1));
            }
            "--detach" if subcommand == "run" => {
                let pid_file = PathBuf::from(value()?);
                if cfg!(windows) {
                    return Err(usage("--detach is for Unix targets; on Windows the agent runs as a service"));
                }
                options.detach = Some(pid_file);
            }
            _ => return Err(usage(format!("unknown option {argument:?} for {subcommand}"))),
        }
    }
    let plan_path = plan_path.ok_or_else(|| usage(format!("{subcommand} needs --plan DIR/plan.json")))?;
    options.plan_path = plan_path.clone();
    Ok(match subcommand.as_str() {
        "run" => Invocation::Run(options),
        "drain" => Invocation::Drain(options),
        "service" => Invocation::Service(options),
        _ => Invocation::Check { plan_path },
    })
}

fn number(name: &str, value: OsString) -> Result<u64, Error> {
    value
        .to_str()
        .and_then(|text| text.parse::<u64>().ok())
        .ok_or_else(|| usage(format!("{name} needs a whole number, got {value:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_words(words: &str) -> Result<Invocation, Error> {
        parse(words.split_whitespace().map(OsString::from))
    }

    #[test]
    fn run_with_every_option() {
        let invocation = parse_words(
            "run --plan /p/plan.json --spool /s.bin --log=/l.log --reboot-command true \
             --drain-deadline-seconds 5 --retry-initial-ms 10 --retry-max-ms=200 --http-timeout-seconds 3",
        )
        .unwrap();
        let Invocation::Run(options) = invocation else { panic!("{invocation:?}") };
        assert_eq!(options.plan_path, PathBuf::from("/p/plan.json"));
        assert_eq!(options.spool_path, Some(PathBuf::from("/s.bin")));
        assert_eq!(options.log_path, Some(PathBuf::from("/l.log")));
        assert_eq!(options.reboot_command, "true");
        assert_eq!(options.drain_deadline, Duration::from_secs(5));
        assert_eq!(options.backoff_initial, Duration::from_millis(10));
        assert_eq!(options.backoff_max, Duration::from_millis(200));
        assert_eq!(options.http_timeout, Duration::from_secs(3));
    }

    #[test]
    fn service_takes_the_options_of_run() {
        let words = "service --plan C:\\P\\fp-1\\plan.json --log C:\\P\\fp-1\\agent.log";
        let Invocation::Service(options) = parse_words(words).unwrap() else { panic!() };
        assert_eq!(options.plan_path, PathBuf::from("C:\\P\\fp-1\\plan.json"));
        assert_eq!(options.log_path, Some(PathBuf::from("C:\\P\\fp-1\\agent.log")));
        assert!(parse_words("service").is_err());
    }

    #[test]
    fn only_run_detaches_and_only_on_unix() {
        let parsed = parse_words("run --plan /p/plan.json --detach /p/agent.pid");
        if cfg!(windows) {
            assert!(parsed.unwrap_err().to_string().contains("runs as a service"));
        } else {
            let Invocation::Run(options) = parsed.unwrap() else { panic!() };
            assert_eq!(options.detach, Some(PathBuf::from("/p/agent.pid")));
        }
        let Invocation::Run(options) = parse_words("run --plan p").unwrap() else { panic!() };
        assert_eq!(options.detach, None, "in the foreground unless asked");
    }

    #[test]
    fn defaults_apply() {
        let Invocation::Drain(options) = parse_words("drain --plan plan.json").unwrap() else { panic!() };
        assert_eq!(options, RunOptions::new(PathBuf::from("plan.json")));
        assert_eq!(parse_words("check --plan p").unwrap(), Invocation::Check { plan_path: "p".into() });
        assert_eq!(parse_words("--version").unwrap(), Invocation::Version);
        assert_eq!(parse_words("run --help").unwrap(), Invocation::Help);
    }

    #[test]
    fn mistakes_are_usage_errors() {
        for (words, expected) in [
            ("", "missing subcommand"),
            ("install --plan p", "unknown subcommand"),
            ("run", "needs --plan"),
            ("run --plan", "--plan needs a value"),
            ("run --plan p --retry-max-ms soon", "whole number"),
            ("run --plan p --verbose", "unknown option"),
            ("check --plan p --spool s", "unknown option"),
            ("drain --plan p --detach p.pid", "unknown option"),
            ("run --plan p --detach", "--detach needs a value"),
        ] {
            let error = parse_words(words).unwrap_err();
            assert!(matches!(error, Error::Usage(_)), "{words}");
            assert!(error.to_string().contains(expected), "{words}: {error}");
        }
    }
}
