//! POSIX shell quoting and the remote scripts the transport runs.
//!
//! Every remote step is one `/bin/sh` script sent on the channel's standard
//! input (so the target's login shell, whatever it is, never parses it). Any
//! value that comes from a rollout, an option or a target — a package name, a
//! path, a host — goes through [`quote`]; nothing is interpolated unquoted.
//! The builders here are pure functions so their output can be unit-tested
//! without a target.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Prefix of the section markers the scripts print (`@@fleetpatch NAME ARGS`).
pub(crate) const MARKER: &str = "@@fleetpatch";

/// Quotes one word for a POSIX shell: returned as is when it only holds
/// characters no shell treats specially, otherwise in single quotes with
/// every `'` written as `'\''`. The result always expands to exactly `word`,
/// as one argument (a NUL byte cannot be passed to a program at all; callers
/// validate names before they get here, see [`is_safe_name`]).
pub fn quote(word: &str) -> Cow<'_, str> {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-+./:=@%,^".contains(&b));
    if plain {
        return Cow::Borrowed(word);
    }
    let mut quoted = String::with_capacity(word.len() + 2);
    quoted.push('\'');
    for ch in word.chars() {
        if ch == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(ch);
        }
    }
    quoted.push('\'');
    Cow::Owned(quoted)
}

/// Quotes each word and joins them with spaces: a command line.
pub fn join<S: AsRef<str>>(words: &[S]) -> String {
    words.iter().map(|w| quote(w.as_ref()).into_owned()).collect::<Vec<_>>().join(" ")
}

/// A name that is safe as one path component and as a systemd unit name:
/// 1 to 200 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn is_safe_name(name: &str) -> bool {
    (1..=200).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A package name as dpkg and rpm allow them (and nothing a shell or an
/// option parser could misread: no leading `-`).
pub fn is_safe_package_name(name: &str) -> bool {
    (1..=256).contains(&name.len())
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-~^:".contains(&b))
}

/// Prints a section marker from a script.
fn marker(script: &mut String, words: &str) {
    let _ = writeln!(script, "printf '%s\\n' {}", quote(&format!("{MARKER} {words}")));
}

/// The lines of a script's output split into sections by their markers:
/// `(header words, body lines)`.
pub(crate) fn sections(output: &str) -> Vec<(Vec<&str>, Vec<&str>)> {
    let mut sections: Vec<(Vec<&str>, Vec<&str>)> = Vec::new();
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix(MARKER) {
            if rest.is_empty() || rest.starts_with(' ') {
                sections.push((rest.split_whitespace().collect(), Vec::new()));
                continue;
            }
        }
        if let Some((_, body)) = sections.last_mut() {
            body.push(line);
        }
    }
    sections
}

/// Facts about the target: OS release, kernel, architecture, account, admin
/// rights, boot. Sections: `os-release`, `uname`, `hostname`, `boot`, `uid`,
/// `admin`.
///
/// Every program the script starts is a fork and an exec on the target (about
/// a millisecond of its CPU each, most of it the dynamic loader), so on Linux
/// the facts are read by the shell itself (`read`, no program): the
/// os-release file, the kernel's name, release, architecture and host name
/// from `/proc/sys/kernel`, the boot's id from
/// `/proc/sys/kernel/random/boot_id` (a new one at every boot) and the
/// effective uid from `/proc/self/status` (the shell's own). Where those
/// files are missing (another Unix, an old kernel without
/// `/proc/sys/kernel/arch`), one `uname`, `awk` for the boot time and
/// `id -u` give them.
pub(crate) fn facts_script(script: &mut String, use_sudo: bool) {
    marker(script, "os-release");
    script.push_str(
        "fp_release=/etc/os-release; [ -r \"$fp_release\" ] || fp_release=/usr/lib/os-release\n\
         if [ -r \"$fp_release\" ]; then\n\
         \x20 while IFS= read -r fp_line || [ -n \"$fp_line\" ]; do printf '%s\\n' \"$fp_line\"; done < \"$fp_release\"\n\
         fi\n",
    );
    // The four words of `uname -s -n -r -m`: name, node, release, machine.
    script.push_str(
        "fp_k=/proc/sys/kernel; fp_s=; fp_n=; fp_r=; fp_m=\n\
         if [ -r $fp_k/ostype ] && [ -r $fp_k/hostname ] && [ -r $fp_k/osrelease ] && [ -r $fp_k/arch ]; then\n\
         \x20 read -r fp_s < $fp_k/ostype; read -r fp_n < $fp_k/hostname\n\
         \x20 read -r fp_r < $fp_k/osrelease; read -r fp_m < $fp_k/arch\n\
         fi\n\
         if [ -n \"$fp_s\" ] && [ -n \"$fp_n\" ] && [ -n \"$fp_r\" ] && [ -n \"$fp_m\" ]; then\n\
         \x20 set -- \"$fp_s\" \"$fp_n\" \"$fp_r\" \"$fp_m\"\n\
         else\n\
         \x20 set -f; set -- $(uname -s -n -r -m 2>/dev/null); set +f\n\
         fi\n",
    );
    marker(script, "uname");
    script
        .push_str("if [ $# -eq 4 ]; then printf '%s\\n' \"$1\" \"$4\" \"$3\"; else uname -s; uname -m; uname -r; fi\n");
    marker(script, "hostname");
    script.push_str("if [ $# -eq 4 ]; then printf '%s\\n' \"$2\"; else hostname 2>/dev/null || uname -n; fi\n");
    // Changes with every boot: the kernel's boot id, else the boot time
    // (seconds since the epoch).
    marker(script, "boot");
    script.push_str(
        "fp_boot=; fp_id=/proc/sys/kernel/random/boot_id\n\
         if [ -r $fp_id ]; then read -r fp_boot < $fp_id; fi\n\
         if [ -n \"$fp_boot\" ]; then printf '%s\\n' \"$fp_boot\"; else awk '/^btime / {print $2}' /proc/stat 2>/dev/null; fi\n",
    );
    marker(script, "uid");
    // Uid: real, effective, saved, filesystem; `id -u` is the effective one.
    script.push_str(
        "fp_uid=\n\
         if [ -r /proc/self/status ]; then\n\
         \x20 while read -r fp_key fp_real fp_effective fp_rest; do\n\
         \x20   if [ \"$fp_key\" = Uid: ]; then fp_uid=$fp_effective; break; fi\n\
         \x20 done < /proc/self/status\n\
         fi\n\
         case $fp_uid in ''|*[!0-9]*) fp_uid=$(id -u);; esac\n\
         printf '%s\\n' \"$fp_uid\"\n",
    );
    marker(script, "admin");
    script.push_str("if [ \"$fp_uid\" = 0 ]; then echo root\n");
    if use_sudo {
        script.push_str(
            "elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then echo sudo\n\
             elif command -v sudo >/dev/null 2>&1; then echo sudo-needs-password\n",
        );
    }
    script.push_str("else echo none; fi\n");
}

/// How one detection rule is queried on a Unix target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DetectionQuery<'a> {
    Dpkg { package: &'a str },
    Rpm { package: &'a str },
}

/// Queries the detection rules, one section `patch INDEX KIND` each followed
/// by `rc INDEX CODE`.
pub(crate) fn detection_script(script: &mut String, queries: &[(u32, DetectionQuery<'_>)]) {
    for (index, query) in queries {
        match query {
            DetectionQuery::Dpkg { package } => {
                marker(script, &format!("patch {index} dpkg"));
                let _ = writeln!(
                    script,
                    "dpkg-query -W -f='${{Status}}\\t${{Version}}\\n' -- {} 2>/dev/null",
                    quote(package)
                );
            }
            DetectionQuery::Rpm { package } => {
                marker(script, &format!("patch {index} rpm"));
                let _ = writeln!(
                    script,
                    "rpm -q --qf '%|EPOCH?{{%{{EPOCH}}}}:{{0}}|:%{{VERSION}}-%{{RELEASE}}\\n' -- {} 2>/dev/null",
                    quote(package)
                );
            }
        }
        let _ = writeln!(script, "printf '{MARKER} rc {index} %s\\n' \"$?\"");
    }
}

/// Paths of one deployment's staging directory on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingPaths {
    pub dir: String,
    pub agent: String,
    pub plan: String,
    pub pid_file: String,
    pub log_file: String,
    /// Created (exclusively) when the agent is started: a deployment id
    /// starts at most one agent.
    pub started_marker: String,
}

/// File name of the agent binary in the staging directory.
pub const AGENT_FILE_NAME: &str = "fleetpatch-agent";

impl StagingPaths {
    pub fn new(staging_root: &str, deployment_id: &str) -> Self {
        let dir = format!("{}/{deployment_id}", staging_root.trim_end_matches('/'));
        Self {
            agent: format!("{dir}/{AGENT_FILE_NAME}"),
            plan: format!("{dir}/{}", fleetpatch_proto::plan::PLAN_FILE_NAME),
            pid_file: format!("{dir}/agent.pid"),
            log_file: format!("{dir}/agent.log"),
            started_marker: format!("{dir}/agent.started"),
            dir,
        }
    }

    /// Temporary name of a file while it is uploaded (renamed into place
    /// once its checksum matched).
    pub fn partial(&self, name: &str) -> String {
        format!("{}/.{name}.part", self.dir)
    }

    pub fn file(&self, name: &str) -> String {
        format!("{}/{name}", self.dir)
    }
}

/// The systemd command that starts the agent as a transient unit named after
/// the deployment: no unit file is written, `--collect` unloads the unit
/// even when it failed, and stopping it kills the whole control group.
pub fn systemd_run_command(deployment_id: &str, paths: &StagingPaths) -> String {
    join(&[
        "systemd-run",
        &format!("--unit={deployment_id}"),
        &format!("--description=fleetpatch agent for deployment {deployment_id}"),
        "--collect",
        "--property=KillMode=control-group",
        "--property=TimeoutStopSec=30",
        &format!("--property=WorkingDirectory={}", paths.dir),
        "--",
        &paths.agent,
        "run",
        "--plan",
        &paths.plan,
    ])
}

/// The command that starts the agent as a detached process where systemd is
/// not PID 1: the agent forks into a session of its own (`run --detach`,
/// so it outlives the SSH session and can be stopped as a session), ignores
/// hang-ups, writes its pid (also its session id) to `agent.pid`, and the
/// command returns once that is written: one program started on the target
/// (it was `setsid`, `sh`, `nohup` and a `sleep` loop for the pid file).
/// Output is appended to `agent.log`.
pub fn detached_command(paths: &StagingPaths) -> String {
    format!(
        "cd {dir} && {agent} </dev/null >>{log} 2>&1",
        dir = quote(&paths.dir),
        agent = join(&[&paths.agent, "run", "--plan", &paths.plan, "--detach", &paths.pid_file]),
        log = quote(&paths.log_file),
    )
}

/// Shell function `fp_agent_pid`: prints the pid from the pid file when that
/// process is alive and really is this deployment's agent (its command line
/// names this plan), so a recycled pid is never taken for the agent. The pid
/// file is read by the shell itself (no `head`, no `tr`): the usual answer,
/// an agent that ended, then costs the target no process at all.
fn agent_pid_function(paths: &StagingPaths) -> String {
    format!(
        "fp_agent_pid() {{\n\
         \x20 [ -s {pid_file} ] || return 1\n\
         \x20 pid=; IFS= read -r pid < {pid_file} 2>/dev/null\n\
         \x20 pid=${{pid#\"${{pid%%[0-9]*}}\"}}; pid=${{pid%%[!0-9]*}}\n\
         \x20 [ -n \"$pid\" ] && kill -0 \"$pid\" 2>/dev/null || return 1\n\
         \x20 if [ -r \"/proc/$pid/cmdline\" ]; then\n\
         \x20   tr '\\000' ' ' < \"/proc/$pid/cmdline\" | grep -qF -- {plan} || return 1\n\
         \x20 elif command -v ps >/dev/null 2>&1; then\n\
         \x20   ps -o args= -p \"$pid\" | grep -qF -- {plan} || return 1\n\
         \x20 fi\n\
         \x20 echo \"$pid\"\n\
         }}\n",
        pid_file = quote(&paths.pid_file),
        plan = quote(&paths.plan),
    )
}

/// Starts the agent once per deployment id. Prints `@@fleetpatch agent
/// started|already-running|already-ran MODE`; exits non-zero with a message
/// on stderr when the agent is not staged or could not be started.
pub(crate) fn start_agent_script(deployment_id: &str, paths: &StagingPaths) -> String {
    let unit = format!("{deployment_id}.service");
    let mut script = String::new();
    script.push_str(&agent_pid_function(paths));
    let _ = write!(
        script,
        "if [ -d /run/systemd/system ] && command -v systemd-run >/dev/null 2>&1; then mode=systemd; else mode=detached; fi\n\
         if [ ! -x {agent} ] || [ ! -f {plan} ]; then\n\
         \x20 printf 'the agent is not staged in %s: stage the deployment first\\n' {dir} >&2; exit 3\n\
         fi\n\
         if [ \"$mode\" = systemd ] && systemctl is-active --quiet -- {unit}; then\n\
         \x20 printf '{MARKER} agent already-running %s\\n' \"$mode\"; exit 0\n\
         fi\n\
         if fp_agent_pid >/dev/null; then printf '{MARKER} agent already-running %s\\n' \"$mode\"; exit 0; fi\n\
         if ! (set -C; : > {marker}) 2>/dev/null; then\n\
         \x20 printf '{MARKER} agent already-ran %s\\n' \"$mode\"; exit 0\n\
         fi\n\
         if [ \"$mode\" = systemd ]; then\n\
         \x20 if ! {systemd_run} >/dev/null 2>{log}.systemd-run; then\n\
         \x20   cat {log}.systemd-run >&2; rm -f -- {marker}; exit 4\n\
         \x20 fi\n\
         elif ! {{ {detached}; }} || [ ! -s {pid_file} ]; then\n\
         \x20 printf 'the agent process did not start (no pid file); see %s\\n' {log} >&2; tail -n 20 {log} >&2; rm -f -- {marker}; exit 4\n\
         fi\n\
         printf '{MARKER} agent started %s\\n' \"$mode\"\n",
        agent = quote(&paths.agent),
        plan = quote(&paths.plan),
        dir = quote(&paths.dir),
        unit = quote(&unit),
        marker = quote(&paths.started_marker),
        systemd_run = systemd_run_command(deployment_id, paths),
        log = quote(&paths.log_file),
        pid_file = quote(&paths.pid_file),
        detached = detached_command(paths),
    );
    script
}

/// Stops the agent (unit, or its detached session: the agent is a `setsid`
/// session leader and runs each installer in a process group of its own, so
/// every process of the session is signalled) if it still runs and removes
/// the staging directory, unless `keep_files`. Safe to run again and again.
pub(crate) fn cleanup_script(deployment_id: &str, paths: &StagingPaths, keep_files: bool) -> String {
    let unit = format!("{deployment_id}.service");
    let mut script = String::new();
    script.push_str(&agent_pid_function(paths));
    // Field 6 of /proc/PID/stat is the session id; after the `comm)` part it is the 4th.
    script.push_str(
        "fp_kill_session() {\n\
         \x20 fp_sig=$1; fp_sid=$2\n\
         \x20 for fp_dir in /proc/[0-9]*; do\n\
         \x20   fp_stat=$(cat \"$fp_dir/stat\" 2>/dev/null) || continue\n\
         \x20   set -- ${fp_stat##*) }\n\
         \x20   [ \"$4\" = \"$fp_sid\" ] && kill -\"$fp_sig\" \"${fp_dir#/proc/}\" 2>/dev/null\n\
         \x20 done\n\
         \x20 return 0\n\
         }\n",
    );
    let _ = write!(
        script,
        "if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then\n\
         \x20 systemctl stop -- {unit} >/dev/null 2>&1\n\
         \x20 systemctl reset-failed -- {unit} >/dev/null 2>&1\n\
         fi\n\
         if pid=$(fp_agent_pid); then\n\
         \x20 kill -TERM -- \"-$pid\" 2>/dev/null || kill -TERM \"$pid\" 2>/dev/null\n\
         \x20 fp_kill_session TERM \"$pid\"\n\
         \x20 i=0\n\
         \x20 while fp_agent_pid >/dev/null && [ $i -lt 100 ]; do sleep 0.05 2>/dev/null || sleep 1; i=$((i+1)); done\n\
         \x20 kill -KILL -- \"-$pid\" 2>/dev/null || kill -KILL \"$pid\" 2>/dev/null\n\
         \x20 fp_kill_session KILL \"$pid\"\n\
         \x20 printf '{MARKER} stopped %s\\n' \"$pid\"\n\
         fi\n",
        unit = quote(&unit),
    );
    if !keep_files {
        let _ = write!(
            script,
            "if [ -e {dir} ] || [ -L {dir} ]; then rm -rf -- {dir}; fi\n\
             if [ -e {dir} ]; then echo 'could not remove the staging directory' >&2; exit 5; fi\n",
            dir = quote(&paths.dir),
        );
    }
    script
}

/// Creates the staging directory (mode 700, owned by the login user) and
/// prints the sha256 of the files already there (section `existing`), so a
/// retried stage uploads only what is missing or different.
pub(crate) fn prepare_staging_script(staging_root: &str, paths: &StagingPaths, names: &[&str]) -> String {
    let mut script = format!(
        "umask 077\n\
         mkdir -p -- {root} && mkdir -p -- {dir} && chmod 700 -- {dir} || exit 6\n\
         if [ ! -O {dir} ]; then echo 'the staging directory is owned by another user' >&2; exit 6; fi\n",
        root = quote(staging_root),
        dir = quote(&paths.dir),
    );
    script.push_str(&sha256_function());
    marker(&mut script, "existing");
    for name in names {
        let _ = writeln!(
            script,
            "if [ -f {path} ]; then printf '%s %s\\n' \"$(fp_sha256 {path})\" {name}; fi",
            path = quote(&paths.file(name)),
            name = quote(name),
        );
    }
    script
}

/// Shell function `fp_sha256 FILE`: the file's hex sha256 with whichever
/// tool the target has (GNU coreutils, BSD, macOS/perl).
fn sha256_function() -> String {
    "fp_sha256() {\n\
     \x20 if command -v sha256sum >/dev/null 2>&1; then sha256sum -- \"$1\" | cut -d' ' -f1\n\
     \x20 elif command -v sha256 >/dev/null 2>&1; then sha256 -q -- \"$1\"\n\
     \x20 elif command -v shasum >/dev/null 2>&1; then shasum -a 256 -- \"$1\" | cut -d' ' -f1\n\
     \x20 else echo no-sha256-tool; fi\n\
     }\n"
    .to_owned()
}

/// Removes partial files after a failed upload or checksum.
pub(crate) fn remove_partials_script(paths: &StagingPaths, names: &[&str]) -> String {
    let mut script = String::from("rm -f --");
    for name in names {
        script.push(' ');
        script.push_str(&quote(&paths.partial(name)));
    }
    script.push('\n');
    script
}

/// Preflight checks run on the target: admin rights, free space where the
/// staging directory goes, the tools a deployment needs, and whether the
/// collector answers on its port.
pub(crate) fn preflight_script(staging_root: &str, use_sudo: bool, collector: Option<(&str, u16)>) -> String {
    let mut script = String::new();
    facts_script(&mut script, use_sudo);
    marker(&mut script, "df");
    let _ = write!(
        script,
        "p={root}\n\
         while [ ! -e \"$p\" ] && [ \"$p\" != / ] && [ -n \"$p\" ]; do p=$(dirname -- \"$p\"); done\n\
         echo \"$p\"\n\
         df -Pk -- \"$p\" 2>&1 | tail -n 1\n\
         if [ -w \"$p\" ]; then echo writable; else echo not-writable; fi\n",
        root = quote(staging_root),
    );
    marker(&mut script, "tools");
    script.push_str(
        "for tool in sha256sum sha256 shasum systemd-run; do\n\
         \x20 if command -v \"$tool\" >/dev/null 2>&1; then echo \"$tool\"; fi\n\
         done\n\
         if [ -d /run/systemd/system ]; then echo systemd-pid1; fi\n",
    );
    if let Some((host, port)) = collector {
        marker(&mut script, "collector");
        let _ = write!(
            script,
            "host={host}; port={port}\n\
             if command -v bash >/dev/null 2>&1 && command -v timeout >/dev/null 2>&1; then\n\
             \x20 if timeout 5 bash -c 'exec 3<>\"/dev/tcp/$0/$1\"' \"$host\" \"$port\" 2>/dev/null; then echo 'ok bash-dev-tcp'; else echo \"fail bash-dev-tcp $?\"; fi\n\
             elif command -v nc >/dev/null 2>&1; then\n\
             \x20 if nc -z -w 5 \"$host\" \"$port\" >/dev/null 2>&1; then echo 'ok nc'; else echo \"fail nc $?\"; fi\n\
             elif command -v curl >/dev/null 2>&1; then\n\
             \x20 curl -s -o /dev/null -m 5 \"http://$host:$port/\"; rc=$?\n\
             \x20 case $rc in 6|7|28) echo \"fail curl $rc\";; *) echo 'ok curl';; esac\n\
             else echo 'unknown no-tool'; fi\n",
            host = quote(host),
            port = port,
        );
    }
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `printf '%s|' WORD` through a real `/bin/sh` and returns what it printed.
    fn through_sh(quoted: &str) -> String {
        let output = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf '%s|' {quoted}"))
            .output()
            .expect("/bin/sh runs");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn quoted_words_reach_the_program_unchanged_and_as_one_argument() {
        let nasty = [
            "plain",
            "",
            " ",
            "two words",
            "it's",
            "'",
            "''",
            "\"double\"",
            "$HOME",
            "${PATH}",
            "`id`",
            "$(id)",
            "a;rm -rf /",
            "a|b&c>d<e",
            "back\\slash",
            "new\nline",
            "tab\there",
            "*",
            "?[a]",
            "~root",
            "#comment",
            "!bang",
            "-n",
            "ünïcødé",
            "%s%n",
        ];
        for word in nasty {
            assert_eq!(through_sh(&quote(word)), format!("{word}|"), "word {word:?}");
        }
        assert_eq!(through_sh(&join(&["a b", "c'd", ""])), "a b|c'd||");
    }

    #[test]
    fn plain_words_stay_readable() {
        assert_eq!(quote("/var/tmp/fleetpatch"), "/var/tmp/fleetpatch");
        assert_eq!(quote("--unit=fp-1"), "--unit=fp-1");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn names_are_checked_before_they_become_paths_or_units() {
        assert!(is_safe_name("fp-0123abcd-1"));
        assert!(is_safe_name("openssl_3.0.15-1_amd64.deb"));
        for bad in ["", ".", "..", ".hidden", "-rf", "a/b", "a b", "a;b", "$(x)", &"x".repeat(201)] {
            assert!(!is_safe_name(bad), "{bad:?}");
        }
        assert!(is_safe_package_name("libssl3"));
        assert!(is_safe_package_name("g++-12"));
        assert!(is_safe_package_name("libstdc++6:amd64"));
        for bad in ["", "-a", "a b", "a'b", "a;b", "a/b", "$x"] {
            assert!(!is_safe_package_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_systemd_command_names_the_unit_after_the_deployment() {
        let paths = StagingPaths::new("/var/tmp/fleetpatch/", "fp-abc-1");
        assert_eq!(paths.dir, "/var/tmp/fleetpatch/fp-abc-1");
        assert_eq!(
            systemd_run_command("fp-abc-1", &paths),
            "systemd-run --unit=fp-abc-1 '--description=fleetpatch agent for deployment fp-abc-1' --collect \
             --property=KillMode=control-group --property=TimeoutStopSec=30 \
             --property=WorkingDirectory=/var/tmp/fleetpatch/fp-abc-1 -- \
             /var/tmp/fleetpatch/fp-abc-1/fleetpatch-agent run --plan /var/tmp/fleetpatch/fp-abc-1/plan.json"
        );
    }

    #[test]
    fn the_systemd_command_quotes_a_staging_root_with_spaces() {
        let paths = StagingPaths::new("/srv/patch staging", "fp-abc-1");
        let command = systemd_run_command("fp-abc-1", &paths);
        assert!(command.contains("'--property=WorkingDirectory=/srv/patch staging/fp-abc-1'"), "{command}");
        assert!(command.ends_with("'/srv/patch staging/fp-abc-1/plan.json'"), "{command}");
    }

    #[test]
    fn the_detached_command_writes_the_pid_of_the_session_leader() {
        let paths = StagingPaths::new("/var/tmp/fleetpatch", "fp-abc-1");
        let command = detached_command(&paths);
        assert!(
            command.contains(
                "/var/tmp/fleetpatch/fp-abc-1/fleetpatch-agent run --plan /var/tmp/fleetpatch/fp-abc-1/plan.json \
                 --detach /var/tmp/fleetpatch/fp-abc-1/agent.pid </dev/null \
                 >>/var/tmp/fleetpatch/fp-abc-1/agent.log 2>&1"
            ),
            "{command}"
        );
        assert!(!command.trim_end().ends_with('&'), "the agent detaches itself, not the shell: {command}");
    }

    #[test]
    fn cleanup_keeps_the_staged_files_only_when_asked() {
        let paths = StagingPaths::new("/var/tmp/fleetpatch", "fp-abc-1");
        let removing = cleanup_script("fp-abc-1", &paths, false);
        let keeping = cleanup_script("fp-abc-1", &paths, true);
        assert!(removing.contains("rm -rf -- /var/tmp/fleetpatch/fp-abc-1"), "{removing}");
        assert!(!keeping.contains("rm -rf"), "{keeping}");
        for script in [&removing, &keeping] {
            assert!(script.contains("fp_kill_session KILL"), "the agent is stopped either way: {script}");
        }
    }

    #[test]
    fn scripts_are_valid_shell() {
        let paths = StagingPaths::new("/tmp/it's here", "fp-abc-1");
        let mut probe = String::new();
        facts_script(&mut probe, true);
        detection_script(
            &mut probe,
            &[(0, DetectionQuery::Dpkg { package: "bash" }), (1, DetectionQuery::Rpm { package: "openssl" })],
        );
        let scripts = [
            probe,
            start_agent_script("fp-abc-1", &paths),
            cleanup_script("fp-abc-1", &paths, false),
            cleanup_script("fp-abc-1", &paths, true),
            prepare_staging_script("/tmp/it's here", &paths, &["a.deb", "plan.json"]),
            remove_partials_script(&paths, &["a.deb"]),
            preflight_script("/tmp/it's here", true, Some(("collector.example", 1072))),
        ];
        for script in scripts {
            let output =
                std::process::Command::new("/bin/sh").arg("-n").arg("-c").arg(&script).output().expect("/bin/sh runs");
            assert!(output.status.success(), "{}\n---\n{script}", String::from_utf8_lossy(&output.stderr));
        }
    }

    fn run_sh(script: &str) -> String {
        let output = std::process::Command::new("/bin/sh").arg("-c").arg(script).output().expect("/bin/sh runs");
        assert!(output.status.success(), "{}\n---\n{script}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs the facts script (after `edit`) and returns each section's body as text.
    fn facts_sections(edit: impl Fn(String) -> String) -> std::collections::HashMap<String, String> {
        let mut script = String::new();
        facts_script(&mut script, false);
        let output = run_sh(&edit(script));
        sections(&output)
            .into_iter()
            .map(|(header, lines)| (header.join(" "), lines.iter().map(|line| format!("{line}\n")).collect()))
            .collect()
    }

    /// What the facts script must say however it reads the facts.
    fn assert_facts_like_the_programs(body: &std::collections::HashMap<String, String>) {
        assert_eq!(body["uname"], run_sh("uname -s; uname -m; uname -r"));
        assert_eq!(body["hostname"], run_sh("hostname 2>/dev/null || uname -n"));
        assert_eq!(body["uid"], run_sh("id -u"));
        let admin = if run_sh("id -u").trim() == "0" { "root\n" } else { "none\n" };
        assert_eq!(body["admin"], admin);
    }

    #[test]
    fn the_facts_script_says_what_the_separate_commands_say() {
        let body = facts_sections(|script| script);
        assert_facts_like_the_programs(&body);
        assert_eq!(body["boot"], run_sh("cat /proc/sys/kernel/random/boot_id"));
        let release = run_sh("cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null");
        assert_eq!(body["os-release"].trim_end(), release.trim_end());
    }

    #[test]
    fn the_facts_script_falls_back_to_programs_without_proc() {
        // The same script on a system without those /proc files.
        let body = facts_sections(|script| {
            let script = script.replace("/proc/sys/", "/nonexistent/sys/").replace("/proc/self/", "/nonexistent/self/");
            assert!(!script.contains("/proc/sys/") && !script.contains("/proc/self/"), "{script}");
            script
        });
        assert_facts_like_the_programs(&body);
        // awk reads the real /proc/stat: the fallback's own program.
        assert_eq!(body["boot"], run_sh("awk '/^btime / {print $2}' /proc/stat"));
    }

    #[test]
    fn the_agent_pid_is_read_by_the_shell_and_checked_against_the_plan() {
        let dir = tempfile_dir();
        let paths = StagingPaths::new(&dir, "fp-abc-1");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let check = format!(
            "{}if pid=$(fp_agent_pid); then echo \"alive $pid\"; else echo gone; fi\n",
            agent_pid_function(&paths)
        );
        assert_eq!(run_sh(&check), "gone\n", "no pid file");
        // A live process whose command line names the plan: this shell.
        let live = format!(
            "echo $$ > {pid_file}; : {plan}; {check}",
            pid_file = quote(&paths.pid_file),
            plan = quote(&paths.plan)
        );
        let output = run_sh(&format!("exec /bin/sh -c {} {}", quote(&live), quote(&paths.plan)));
        assert!(output.starts_with("alive "), "{output}");
        // A pid that is alive but not this deployment's agent (pid 1).
        std::fs::write(&paths.pid_file, "1\n").unwrap();
        assert_eq!(run_sh(&check), "gone\n");
        std::fs::write(&paths.pid_file, "not a pid\n").unwrap();
        assert_eq!(run_sh(&check), "gone\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_dir() -> String {
        let dir = std::env::temp_dir()
            .join(format!("fp-shell-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
        dir.display().to_string()
    }

    #[test]
    fn output_splits_into_sections() {
        let output = "noise\n@@fleetpatch uname\nLinux\nx86_64\n@@fleetpatch rc 3 0\n@@fleetpatchx no\n";
        let sections = sections(output);
        assert_eq!(sections.len(), 2);
        assert_eq!(sections[0], (vec!["uname"], vec!["Linux", "x86_64"]));
        assert_eq!(sections[1], (vec!["rc", "3", "0"], vec!["@@fleetpatchx no"]));
    }
}
