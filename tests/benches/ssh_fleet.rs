//! A rollout to 100 SSH targets, measured: one private `sshd` per target on
//! loopback (`SshFleet`), each receiving the real agent, a 5 MiB installer
//! and a small install script that checks the installer's sha256 and
//! sleeps 0.2 s; the whole pipeline (scheduler, collector, workers) runs in
//! this process on the machine's RabbitMQ and PostgreSQL.
//!
//! `cargo bench -p fleetpatch-tests --bench ssh_fleet` prints:
//! - wall time from `POST /v1/rollouts` to the last target's final state,
//!   and how much later the last cleanup was done (the bench waits for the
//!   cleanups, whose cost is part of a deployment's, before it reads CPU);
//! - CPU seconds of this process (scheduler, collector, workers; the CPU
//!   of the bench's own reaper and /proc sampler threads is counted per
//!   thread and left out) and of
//!   everything on the "targets" side (the sshd instances, their sessions,
//!   the agents and the installers): this process makes itself a child
//!   subreaper, so the daemonized sshd and the detached agents become its
//!   children, are reaped here, and count in `RUSAGE_CHILDREN`;
//! - peak resident memory (`VmHWM`) of this process, and the peak of the
//!   summed RSS of all its descendants (sshd, sessions, agents), sampled
//!   every 100 ms from `/proc`;
//! - SSH logins, commands and SFTP sessions per target, counted in the
//!   peers' sshd logs (LogLevel VERBOSE logs each session sshd starts).
//!
//! Environment: `FLEETPATCH_BENCH_TARGETS` (default 100),
//! `FLEETPATCH_BENCH_WORKERS` (default 2), `FLEETPATCH_BENCH_WORKER_CONCURRENCY`
//! (default 50), `FLEETPATCH_BENCH_SSH_REUSE_SECONDS` (default 30; 0 logs in
//! for every step), `FLEETPATCH_BENCH_RELAYS` (default 0: the workers push
//! the installers; N > 0: N relays (`fleetpatch relay`, in this process) in
//! front of the scheduler's content store, the targets spread over N sites,
//! and the agents pull the installers from their site's relay). It prints the
//! installer bytes that left the central content store: pushed, the bytes
//! the workers staged (every target gets every installer); pulled, what the
//! relays fetched from the scheduler (their counters). The agent binary and
//! the plan are pushed either way. `FLEETPATCH_BENCH_AGENT` names the agent
//! binary the workers stage (default: the test build of `fleetpatch-agent`;
//! `target/release/fleetpatch-agent` measures what a deployment ships).
//!
//! Then, in the same run, against the same sshd peers and with the same
//! concurrency, **the OpenSSH floor**: what Debian's own client needs to do
//! the minimum per target: one login (`ssh -M`, a control master), one
//! `sftp` session putting the same two files, one `ssh` command running the
//! same check script, and the master's exit. It prints the floor's wall
//! time, its sshd CPU (target side) and its client CPU, and fleetpatch's
//! figures as ratios to them. `FLEETPATCH_BENCH_FLOOR=0` leaves it out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetpatch_proto::state::{PatchState, TargetState};
use fleetpatch_tests::{agent_binary, Sandbox, SandboxOptions};
use fleetpatch_transport_ssh::test_support::SshFleet;
use sha2::Digest;

const PAYLOAD_BYTES: usize = 5 << 20;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rusage(who: libc::c_int) -> libc::rusage {
    // SAFETY: getrusage writes into the zeroed struct we own.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    }
}

fn cpu_seconds(usage: &libc::rusage) -> f64 {
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU time of the calling thread, in microseconds.
fn thread_cpu_micros() -> u64 {
    // SAFETY: clock_gettime writes into the zeroed struct we own.
    let time = unsafe {
        let mut time: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut time);
        time
    };
    time.tv_sec as u64 * 1_000_000 + time.tv_nsec as u64 / 1_000
}

/// Runs `work` and adds the CPU it took on this thread to `spent` (µs): the
/// bench's own measuring (the reaper, the /proc sampler) runs in this
/// process and is taken out of the control plane's figure.
fn counted<T>(spent: &std::sync::atomic::AtomicU64, work: impl FnOnce() -> T) -> T {
    let before = thread_cpu_micros();
    let result = work();
    spent.fetch_add(thread_cpu_micros().saturating_sub(before), Ordering::Relaxed);
    result
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Reaps every child (sshd daemons and detached agents re-parented here)
/// until `stop`, so their CPU time lands in `RUSAGE_CHILDREN`.
fn start_reaper(stop: Arc<AtomicBool>, spent: Arc<std::sync::atomic::AtomicU64>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || loop {
        // SAFETY: plain waitpid on any child, non-blocking.
        let pid = counted(&spent, || unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) });
        if pid <= 0 {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// CPU seconds of a running sshd and of the sessions it reaped (`/proc/PID/stat`).
fn sshd_cpu_seconds(pid_file: &std::path::Path) -> f64 {
    let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|p| p.trim().parse::<u32>().ok()) else {
        return 0.0;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // utime, stime, cutime, cstime: fields 14-17 of stat, 11-14 here.
    let ticks: u64 = (11..=14).filter_map(|i| fields.get(i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Summed RSS (KiB) of every descendant of this process, from `/proc`.
fn descendants_rss_kib() -> u64 {
    let me = std::process::id();
    let mut parent_of = std::collections::HashMap::new();
    let mut rss = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        // After the command: state ppid ... rss (pages) is field 24 of stat, index 21 here.
        let (Some(ppid), Some(pages)) = (fields.get(1), fields.get(21)) else { continue };
        parent_of.insert(pid, ppid.parse::<u32>().unwrap_or(0));
        rss.insert(pid, pages.parse::<u64>().unwrap_or(0) * 4);
    }
    let descends = |mut pid: u32| {
        for _ in 0..64 {
            match parent_of.get(&pid) {
                Some(&parent) if parent == me => return true,
                Some(&parent) if parent > 1 => pid = parent,
                _ => return false,
            }
        }
        false
    };
    rss.iter().filter(|(pid, _)| descends(**pid)).map(|(_, kib)| kib).sum()
}

/// What the OpenSSH floor took: wall time, sshd CPU (the peers' own and
/// their reaped sessions', the check script included) and the clients' CPU.
struct Floor {
    wall: Duration,
    sshd_seconds: f64,
    client_seconds: f64,
}

/// The OpenSSH floor over every peer, `concurrency` at a time: one login
/// (a control master), one `sftp` batch putting `files` into the peer's
/// staging root, one command running `check` there, and the master's exit.
/// Every step must succeed.
fn openssh_floor(fleet: &SshFleet, files: &[std::path::PathBuf], check: &str, concurrency: usize) -> Floor {
    let peers = fleet.peers();
    let sshd_before: f64 = peers.iter().map(|peer| sshd_cpu_seconds(&peer.dir().join("sshd.pid"))).sum();
    let clients_before = cpu_seconds(&rusage(libc::RUSAGE_CHILDREN));
    let key = fleet.keys().client.private_key_path.clone();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency.max(1) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(peer) = peers.get(index) else { break };
                let socket = peer.dir().join("floor.sock");
                let dir = peer.staging_root().join("floor");
                let common = |program: &str| {
                    let mut command = std::process::Command::new(program);
                    command
                        .arg("-i")
                        .arg(&key)
                        .arg("-o")
                        .arg(format!("UserKnownHostsFile={}", peer.known_hosts_file().display()))
                        .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
                        .arg("-o")
                        .arg(format!("ControlPath={}", socket.display()))
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null());
                    command
                };
                let target = format!("root@{}", peer.host());
                let port = peer.port().to_string();
                let run = |mut command: std::process::Command, what: &str| {
                    let output = command.output().unwrap_or_else(|error| panic!("{what}: {error}"));
                    assert!(
                        output.status.success(),
                        "{what} on port {port}: {}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                };
                // The login: a control master in the foreground (a child
                // this thread waits for), ready when its socket appears.
                let _ = std::fs::remove_file(&socket);
                let mut login = common("ssh");
                login.args(["-p", &port, "-M", "-N", &target]).stderr(std::process::Stdio::piped());
                let mut master = login.spawn().expect("ssh -M (the floor's login)");
                let deadline = Instant::now() + Duration::from_secs(30);
                while !socket.exists() {
                    if let Ok(Some(status)) = master.try_wait() {
                        panic!("ssh -M on port {port} exited before its socket was ready: {status}");
                    }
                    assert!(Instant::now() < deadline, "ssh -M on port {port}: no control socket within 30 s");
                    std::thread::sleep(Duration::from_millis(5));
                }
                // One sftp session: the directory (an error ignored if it
                // exists), then the files.
                let mut batch = format!("-mkdir {}\n", dir.display());
                for file in files {
                    let name = file.file_name().unwrap_or_default().to_string_lossy();
                    batch.push_str(&format!("put {} {}/{name}\n", file.display(), dir.display()));
                }
                let mut sftp = common("sftp");
                sftp.args(["-P", &port, "-b", "-", &target]).stdin(std::process::Stdio::piped());
                let mut child = sftp.spawn().expect("sftp");
                {
                    use std::io::Write;
                    let mut stdin = child.stdin.take().expect("sftp stdin");
                    stdin.write_all(batch.as_bytes()).expect("sftp batch");
                }
                let status = child.wait().expect("sftp");
                assert!(status.success(), "sftp put on port {port}");
                let mut exec = common("ssh");
                exec.args(["-p", &port, &target, &format!("cd {} && sh ./{check}", dir.display())]);
                run(exec, "ssh check script");
                let mut exit = common("ssh");
                exit.args(["-p", &port, "-O", "exit", &target]).stderr(std::process::Stdio::null());
                let _ = exit.status();
                let _ = master.wait();
            });
        }
    });
    let wall = started.elapsed();
    // Let the masters' sessions end and be reaped by their sshd.
    std::thread::sleep(Duration::from_millis(300));
    let sshd_after: f64 = peers.iter().map(|peer| sshd_cpu_seconds(&peer.dir().join("sshd.pid"))).sum();
    Floor {
        wall,
        sshd_seconds: sshd_after - sshd_before,
        client_seconds: cpu_seconds(&rusage(libc::RUSAGE_CHILDREN)) - clients_before,
    }
}

/// A 5 MiB "installer": a script that exits at once, followed by text the
/// shell never reads (so the bytes are staged and hashed, not executed).
fn payload() -> Vec<u8> {
    let mut bytes = b"#!/bin/sh\nexit 0\n".to_vec();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    while bytes.len() < PAYLOAD_BYTES {
        bytes.push(b'#');
        for _ in 0..63 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.push(b"0123456789abcdef"[(state & 15) as usize]);
        }
        bytes.push(b'\n');
    }
    bytes.truncate(PAYLOAD_BYTES);
    bytes
}

fn main() {
    let targets = env_number("FLEETPATCH_BENCH_TARGETS", 100);
    let workers = env_number("FLEETPATCH_BENCH_WORKERS", 2);
    let worker_concurrency = env_number("FLEETPATCH_BENCH_WORKER_CONCURRENCY", 50);
    let relay_count = env_number("FLEETPATCH_BENCH_RELAYS", 0);
    let with_floor = env_number("FLEETPATCH_BENCH_FLOOR", 1) != 0;
    assert!(!std::path::Path::new("/run/systemd/system").exists(), "the bench measures the detached agent path");
    // Before any child exists that something else waits for.
    let agent = match std::env::var_os("FLEETPATCH_BENCH_AGENT") {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            assert!(path.is_file(), "FLEETPATCH_BENCH_AGENT: {} is not a file", path.display());
            path
        }
        None => agent_binary().to_path_buf(),
    };
    let agent_shown = format!(
        "{} ({} bytes)",
        agent.display(),
        std::fs::metadata(&agent).map(|m| m.len()).expect("the agent binary is readable")
    );
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only changes this process's reaping.
    let subreaper = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == 0;

    let started_fleet = Instant::now();
    let fleet = SshFleet::start(targets).unwrap_or_else(|error| {
        panic!("start {targets} sshd peers: {error} (one sshd each: check `ulimit -n` and MaxStartups)")
    });
    let fleet_start = started_fleet.elapsed();
    let stop_reaper = Arc::new(AtomicBool::new(false));
    // CPU µs the bench's reaper and sampler threads spent measuring.
    let harness_micros = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut reaper = start_reaper(stop_reaper.clone(), harness_micros.clone());
    let stop_sampler = Arc::new(AtomicBool::new(false));
    // Children so far: the agent build and the sshd starters, not the rollout.
    let children_before = rusage(libc::RUSAGE_CHILDREN);
    let peak_descendants = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (stop, peak, spent) = (stop_sampler.clone(), peak_descendants.clone(), harness_micros.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(counted(&spent, descendants_rss_kib), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // The installer and the check script, also on disk for the OpenSSH floor.
    let payload = payload();
    let payload_sha = hex::encode(sha2::Sha256::digest(&payload));
    let script = format!(
        "#!/bin/sh\ncd \"$(dirname \"$0\")\" || exit 1\n\
         echo '{payload_sha}  payload-5mib.sh' | sha256sum -c - || exit 10\nsleep 0.2\n"
    );
    let floor_files = tempfile::tempdir().unwrap();
    let floor_paths = [floor_files.path().join("payload-5mib.sh"), floor_files.path().join("check.sh")];
    std::fs::write(&floor_paths[0], &payload).unwrap();
    std::fs::write(&floor_paths[1], &script).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let before_self = rusage(libc::RUSAGE_SELF);
    let harness_before = harness_micros.load(Ordering::Relaxed);
    let result = runtime.block_on(async {
        let sandbox = Sandbox::start(SandboxOptions {
            workers,
            worker_concurrency: worker_concurrency as u16,
            ssh: Some(fleetpatch_transport_ssh::SshOptions {
                connection_reuse_seconds: env_number("FLEETPATCH_BENCH_SSH_REUSE_SECONDS", 30) as u64,
                ..fleet.options()
            }),
            agent_binary: Some(agent),
            step_timeout_seconds: 120,
            credentials: [(
                "fleet-key".to_owned(),
                fleetpatch_tests::credential_in_file(&fleet.keys().client.private_key_path, &["ssh"], &["127.0.0.0/8"]),
            )]
            .into(),
            ..SandboxOptions::default()
        })
        .await;
        let (payload_sha_uploaded, payload_size) = sandbox.upload_content(payload.clone()).await;
        assert_eq!(payload_sha, payload_sha_uploaded);
        let (script_sha, script_size) = sandbox.upload_content(script.clone().into_bytes()).await;
        // Relays of the scheduler's content store, one per site, with a viewer key.
        let relay_dir = tempfile::tempdir().unwrap();
        let relay_shutdown = fleetpatch_runtime::Shutdown::new();
        let mut relays = Vec::new();
        for site in 0..relay_count {
            let options = sandbox.relay_options(relay_dir.path(), &format!("site-{site}")).await;
            let health = fleetpatch_runtime::Health::new();
            relays.push(fleetpatch_relay::start(options, health, relay_shutdown.clone()).await.expect("start a relay"));
        }
        let rules: Vec<serde_json::Value> = relays
            .iter()
            .enumerate()
            .map(|(site, relay)| serde_json::json!({"match": format!("site=s{site}"), "url": format!("http://{}", relay.local_addr)}))
            .collect();
        let request = serde_json::json!({
            "name": format!("bench-ssh-{targets}"),
            "concurrency": targets,
            "timeout_seconds": 120,
            "heartbeat_seconds": 10,
            "max_tries": 3,
            "patches": [
                {"name": "payload", "file": "payload-5mib.sh", "sha256": payload_sha, "size": payload_size, "installer": "script"},
                {"name": "check-and-sleep", "file": "check.sh", "sha256": script_sha, "size": script_size, "installer": "script"},
            ],
            "targets": fleet.peers().iter().enumerate().map(|(index, peer)| serde_json::json!({
                "host": peer.host(),
                "port": peer.port(),
                "transport": "ssh",
                "credential": "fleet-key",
                "labels": {
                    "user": "root",
                    "ssh.staging_root": peer.staging_root().display().to_string(),
                    "site": format!("s{}", index % relay_count.max(1)),
                },
            })).collect::<Vec<_>>(),
            "relays": rules,
        });
        let created = Instant::now();
        let id = sandbox.create_rollout(request).await;
        let all = sandbox
            .wait_for("every target to reach a final state", Duration::from_secs(600), async || {
                let all = sandbox.all_targets(id).await;
                all.iter().all(|t| t.state.is_final()).then_some(all)
            })
            .await;
        let wall = created.elapsed();
        // A deployment ends with its cleanup (the agent stopped, the staging
        // directory removed), queued when its target reached a final state:
        // wait for every cleanup, out of the wall time, so that the peers'
        // CPU read below holds all of them.
        let cleanup_started = Instant::now();
        let staged_left = || {
            fleet
                .peers()
                .iter()
                .filter_map(|peer| std::fs::read_dir(peer.staging_root()).ok())
                .flat_map(|dir| dir.flatten())
                .filter(|entry| entry.file_name().to_string_lossy().starts_with("fp-"))
                .count()
        };
        while staged_left() > 0 && cleanup_started.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cleanups = (cleanup_started.elapsed(), staged_left());
        let succeeded = all.iter().filter(|t| t.state == TargetState::Succeeded).count();
        let mut patch_failures = Vec::new();
        for target in all.iter().filter(|t| t.state != TargetState::Succeeded) {
            let history = sandbox.store.transitions(target.id).await.unwrap_or_default();
            let history: Vec<String> = history.iter().map(|t| format!("{} {}", t.at.format("%H:%M:%S%.3f"), t.to)).collect();
            let events = sandbox.store.agent_events(target.id).await.unwrap_or_default();
            let events: Vec<String> = events.iter().map(|e| format!("{} {}", e.seq, e.kind)).collect();
            patch_failures.push(format!(
                "127.0.0.1:{} {}: {}\n    transitions: {history:?}\n    agent events: {events:?}",
                target.port.unwrap_or(0),
                target.state,
                target.error.as_deref().unwrap_or("")
            ));
        }
        for target in all.iter().filter(|t| t.state == TargetState::Succeeded).take(3) {
            let patches = sandbox.store.target_patches(target.id).await.unwrap();
            assert!(patches.iter().all(|p| p.state == PatchState::Succeeded && p.exit_code == Some(0)), "{patches:?}");
        }
        let pulled = all.iter().filter(|t| t.delivery.as_deref().is_some_and(|d| d.starts_with("relay "))).count();
        let central_bytes = if relays.is_empty() {
            // The workers staged every installer on every target that got a deployment.
            let staged = all.iter().filter(|t| t.delivery.is_some()).count() as u64;
            (staged * (payload_size + script_size), "pushed by the workers over SFTP")
        } else {
            let fetched: u64 = relays.iter().map(|relay| relay.stats().upstream_bytes).sum();
            (fetched, "fetched by the relays from the scheduler (their counters)")
        };
        relay_shutdown.trigger();
        sandbox.stop().await;
        (wall, cleanups, succeeded, all.len(), patch_failures, (pulled, central_bytes, payload_size + script_size))
    });
    let after_self = rusage(libc::RUSAGE_SELF);
    let harness_seconds = harness_micros.load(Ordering::Relaxed).saturating_sub(harness_before) as f64 / 1e6;
    drop(runtime);
    // sshd logs each login and each session it starts (LogLevel VERBOSE):
    // every command is a shell sshd forks, every SFTP session a subsystem.
    let logs: Vec<String> = fleet.peers().iter().map(|peer| peer.log()).collect();
    let count = |needle: &str| logs.iter().map(|log| log.matches(needle).count()).sum::<usize>();
    let logins = count("Accepted publickey");
    let commands = count("Starting session: command");
    let sftp_sessions = count("Starting session: subsystem 'sftp'");
    let sshd_seconds: f64 = fleet.peers().iter().map(|peer| sshd_cpu_seconds(&peer.dir().join("sshd.pid"))).sum();
    let concurrency = (workers * worker_concurrency).min(targets);
    // The floor waits for its own clients: no reaper may take their exit
    // status meanwhile (nothing else is left to reap: every agent ended).
    stop_reaper.store(true, Ordering::Relaxed);
    let _ = reaper.join();
    let floor = with_floor.then(|| openssh_floor(&fleet, &floor_paths, "check.sh", concurrency));
    let stop_reaper = Arc::new(AtomicBool::new(false));
    reaper = start_reaper(stop_reaper.clone(), harness_micros.clone());
    // Stop the sshd peers; the reaper collects them (and their CPU).
    drop(fleet);
    std::thread::sleep(Duration::from_millis(300));
    stop_reaper.store(true, Ordering::Relaxed);
    stop_sampler.store(true, Ordering::Relaxed);
    let _ = reaper.join();
    let _ = sampler.join();
    let children = rusage(libc::RUSAGE_CHILDREN);
    let (
        wall,
        (cleanup_wait, staged_left),
        succeeded,
        total,
        failures,
        (pulled, (central_bytes, how), installer_bytes),
    ) = result;

    // The floor's clients and its sshd sessions were reaped here too.
    let floor_cpu = floor.as_ref().map_or(0.0, |f| f.sshd_seconds + f.client_seconds);
    let target_side = cpu_seconds(&children) - cpu_seconds(&children_before) - floor_cpu;
    let control_plane = cpu_seconds(&after_self) - cpu_seconds(&before_self) - harness_seconds;
    println!("ssh fleet bench: {total} targets (one sshd each on loopback), 5 MiB installer + check script (sha256 + sleep 0.2 s)");
    println!("  agent binary                {agent_shown}");
    println!("  sshd fleet start            {:>8.2} s (not in the wall time)", fleet_start.as_secs_f64());
    println!("  wall, create -> last final  {:>8.2} s", wall.as_secs_f64());
    println!("  succeeded                   {succeeded:>8} of {total}");
    println!(
        "  cleanups done               {:>8.2} s later (not in the wall time){}",
        cleanup_wait.as_secs_f64(),
        if staged_left == 0 { String::new() } else { format!("; {staged_left} staging directories still there") }
    );
    println!(
        "  CPU, this process           {control_plane:>8.2} s (scheduler, collector, {workers} workers x {worker_concurrency} slots; during the rollout; the bench's own reaper and /proc sampler, {harness_seconds:.2} s, left out)"
    );
    println!(
        "  CPU, target side            {target_side:>8.2} s (sshd, sessions, agents, installers; rollout and fleet stop){}",
        if subreaper { "" } else { " [not a subreaper: agents not counted]" }
    );
    let per_target = |n: usize| n as f64 / total.max(1) as f64;
    println!(
        "  SSH per target              {:>8.2} logins, {:.2} commands, {:.2} SFTP sessions",
        per_target(logins),
        per_target(commands),
        per_target(sftp_sessions)
    );
    println!("    of which sshd + sessions    {sshd_seconds:>8.2} s (the rest: agents and installers)");
    println!("  peak RSS, this process      {:>8.1} MiB (VmHWM)", vm_hwm_kib() as f64 / 1024.0);
    println!(
        "  peak RSS, target side       {:>8.1} MiB (sum over sshd, sessions, agents; sampled every 100 ms)",
        peak_descendants.load(Ordering::Relaxed) as f64 / 1024.0
    );
    println!("  installers delivered        {:>8} pulled from {relay_count} relays, {} pushed", pulled, total - pulled);
    println!(
        "  installer bytes from center {:>8.1} MiB {how} (push to all: {:.1} MiB)",
        central_bytes as f64 / f64::from(1 << 20),
        (installer_bytes * total as u64) as f64 / f64::from(1 << 20)
    );
    if let Some(floor) = &floor {
        let n = total.max(1) as f64;
        println!(
            "OpenSSH floor, same run and peers, {concurrency} at a time: one login (ssh -M), one sftp session (mkdir, put both files), one ssh command (the check script), exit"
        );
        println!(
            "  wall                        {:>8.2} s    fleetpatch / floor {:>6.2} x",
            floor.wall.as_secs_f64(),
            wall.as_secs_f64() / floor.wall.as_secs_f64()
        );
        println!(
            "  sshd + sessions per target  {:>8.3} s    fleetpatch {:.3} s: {:>6.2} x",
            floor.sshd_seconds / n,
            sshd_seconds / n,
            sshd_seconds / floor.sshd_seconds
        );
        println!(
            "  target side per target      {:>8.3} s    fleetpatch {:.3} s (agents and installers too): {:>6.2} x",
            floor.sshd_seconds / n,
            target_side / n,
            target_side / floor.sshd_seconds
        );
        println!(
            "  client CPU per target       {:>8.3} s    fleetpatch's control plane {:.3} s: {:>6.2} x",
            floor.client_seconds / n,
            control_plane / n,
            control_plane / floor.client_seconds
        );
    }
    for failure in &failures {
        println!("  not succeeded: {failure}");
    }
    if succeeded != total {
        std::process::exit(1);
    }
}
