//! The services as child processes, and what `/proc` and their `/metrics` say about them:
//! memory, CPU per process group, histogram quantiles.

use super::*;

// ---------------------------------------------------------------- child services

/// One service process, as a deployment runs it.
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) child: Child,
    pub(crate) pid: u32,
    /// Base URL of its HTTP listener (`/readyz`, `/metrics`).
    pub(crate) url: String,
    pub(crate) log: PathBuf,
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// This process's soft limit of open files (`/proc/self/limits`); `None`
/// when it is unlimited or cannot be read.
pub(crate) fn open_files_limit() -> Option<u64> {
    parse_open_files_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find_map(|line| line.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// Files this process may hold open at once, besides its agents' sockets:
/// the database pool, the broker, logs, and the HTTP client's idle
/// connections of the phases before.
const OPEN_FILES_BESIDES_AGENTS: u64 = 2_048;

/// Why a run with `agents` paced agents (0: no paced run) and `clients`
/// closed-loop senders may run out of open files under `limit`, if it may:
/// the HTTP ceilings and the paced HTTP floor run their bare server in this
/// process, so it holds both ends of each of those connections.
pub(crate) fn open_files_shortfall(agents: usize, clients: usize, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    let (connections, flag) =
        if agents >= clients { (agents, "--collector-targets") } else { (clients, "--collector-clients") };
    let needed = 2 * connections as u64 + OPEN_FILES_BESIDES_AGENTS;
    (needed > limit).then(|| {
        format!(
            "this process may open {limit} files, and the bare HTTP server of its ceilings and paced floor runs \
             here, so it holds both ends of up to {connections} connections besides its other files: it may fail \
             with \"Too many open files\" (os error 24); raise the limit to at least {needed} (`ulimit -n \
             {needed}`) or lower {flag}"
        )
    })
}

/// User + system CPU seconds (`/proc/PID/stat`, in USER_HZ = 100 ticks per second).
pub(crate) fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_seconds(&proc_stat_fields(&stat)?.1, false)
}

/// The fields of `/proc/PID/stat` after the command name (state first), and
/// the command name (`comm`).
pub(crate) fn proc_stat_fields(stat: &str) -> Option<(&str, Vec<&str>)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    Some((&stat[open + 1..close], stat.get(close + 2..)?.split_whitespace().collect()))
}

/// CPU seconds (user + system) of a process, and with `children` also of
/// its children that it has waited for: where the work of a PostgreSQL
/// backend goes when it disconnects.
pub(crate) fn stat_cpu_seconds(fields: &[&str], children: bool) -> Option<f64> {
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok());
    let own = tick(11)? + tick(12)?;
    Some(if children { own + tick(13)? + tick(14)? } else { own } / 100.0)
}

/// CPU seconds of this process's threads named `name` (`/proc/self/task/*/comm`),
/// from their `schedstat` (nanoseconds). A thread that ended is not counted.
pub(crate) fn own_threads_cpu_seconds(name: &str) -> f64 {
    let mut seconds = 0.0;
    for entry in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let path = entry.path();
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|comm| comm.trim_end() == name) {
            seconds += std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|stat| stat.split_whitespace().next()?.parse::<f64>().ok())
                .map_or(0.0, |nanos| nanos / 1e9);
        }
    }
    seconds
}

/// CPU time spent, machine-wide and per group of processes, at one moment.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuSnapshot {
    pub(crate) cores: usize,
    /// Busy seconds of all CPUs together (`/proc/stat`: all but idle and iowait).
    pub(crate) machine: f64,
    /// All seconds of all CPUs together, idle included: the busy share is
    /// read over the same ticks, so a run shorter than a few ticks cannot
    /// come out busier than every core.
    pub(crate) machine_total: f64,
    pub(crate) groups: BTreeMap<String, f64>,
    /// PostgreSQL's live processes by pid: whose work they did, their CPU
    /// seconds (see [`crate::pgclients`]).
    pub(crate) postgres_backends: BTreeMap<u32, crate::pgclients::Backend>,
}

/// Processes counted by their command name, with the children they reaped.
pub(crate) const CPU_GROUPS_BY_COMMAND: [(&str, &str); 2] = [("postgres", "postgresql"), ("beam.smp", "rabbitmq")];

impl CpuSnapshot {
    /// Now: the machine, `services` (name, pid), this process (named
    /// `this_process`: what it plays in the run) and, when they run on this
    /// machine, PostgreSQL and RabbitMQ (found by command name).
    pub(crate) fn take(this_process: &str, services: &[(String, u32)]) -> Self {
        let (cores, machine, machine_total) =
            std::fs::read_to_string("/proc/stat").ok().map(|text| Self::machine_busy(&text)).unwrap_or((0, 0.0, 0.0));
        let mut groups = BTreeMap::new();
        let clients: Vec<(String, u32)> =
            services.iter().cloned().chain([(this_process.to_owned(), std::process::id())]).collect();
        for (name, pid) in &clients {
            if let Some(seconds) = proc_cpu_seconds(*pid) {
                groups.insert(name.clone(), seconds);
            }
        }
        let port_owners = crate::pgclients::port_owners(&clients);
        let mut postgres_backends = BTreeMap::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let Some((command, fields)) = proc_stat_fields(&stat) else { continue };
            let Some((_, group)) = CPU_GROUPS_BY_COMMAND.iter().find(|(c, _)| *c == command) else { continue };
            if let Some(seconds) = stat_cpu_seconds(&fields, true) {
                *groups.entry((*group).to_owned()).or_default() += seconds;
            }
            if command == "postgres" {
                if let Some(backend) = crate::pgclients::backend(pid, &port_owners) {
                    postgres_backends.insert(pid, backend);
                }
            }
        }
        Self { cores, machine, machine_total, groups, postgres_backends }
    }

    /// The same snapshot with this process's threads named `threads`
    /// counted apart, as the group `group`, and taken out of `this_process`
    /// (the name it was taken with).
    pub(crate) fn with_own_threads(self, this_process: &str, threads: &str, group: &str) -> Self {
        let spent = own_threads_cpu_seconds(threads);
        self.counted_apart(this_process, group, spent)
    }

    /// `spent` CPU seconds of `this_process` moved to the group `group`.
    pub(crate) fn counted_apart(mut self, this_process: &str, group: &str, spent: f64) -> Self {
        if let Some(whole) = self.groups.get_mut(this_process) {
            *whole = (*whole - spent).max(0.0);
        }
        self.groups.insert(group.to_owned(), spent);
        self
    }

    /// (CPUs, busy seconds of all of them, all seconds of all of them)
    /// from `/proc/stat`'s text.
    pub(crate) fn machine_busy(stat: &str) -> (usize, f64, f64) {
        let cores = stat.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count();
        let (busy, total) = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .map(|line| {
                let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal (guest time is inside user)
                let sum = |fields: &[usize]| fields.iter().filter_map(|&i| ticks.get(i)).sum::<f64>() / 100.0;
                (sum(&[0, 1, 2, 5, 6, 7]), sum(&[0, 1, 2, 3, 4, 5, 6, 7]))
            })
            .unwrap_or((0.0, 0.0));
        (cores, busy, total)
    }

    /// What happened between `self` and `later`, per report (or request).
    pub(crate) fn per_report(&self, later: &CpuSnapshot, reports: usize, seconds: f64) -> CpuPerReport {
        let reports = reports.max(1) as f64;
        let busy = (later.machine - self.machine).max(0.0);
        let total = (later.machine_total - self.machine_total).max(0.0);
        let mut micros_per_report = BTreeMap::new();
        let mut counted = 0.0;
        for (name, after) in &later.groups {
            let spent = (after - self.groups.get(name).copied().unwrap_or(0.0)).max(0.0);
            counted += spent;
            micros_per_report.insert(name.clone(), spent * 1e6 / reports);
        }
        micros_per_report.insert("other".to_owned(), (busy - counted).max(0.0) * 1e6 / reports);
        let postgresql_by_client = crate::pgclients::spent_by_owner(&self.postgres_backends, &later.postgres_backends)
            .into_iter()
            .map(|(name, spent)| (name, spent * 1e6 / reports))
            .collect();
        CpuPerReport {
            cores: later.cores,
            machine_busy: if total > 0.0 {
                busy / total
            } else if seconds > 0.0 && later.cores > 0 {
                (busy / (seconds * later.cores as f64)).min(1.0)
            } else {
                0.0
            },
            micros_per_report,
            postgresql_by_client,
            machine_micros_per_report: busy * 1e6 / reports,
            machine_bound_per_second: if busy > 0.0 { later.cores as f64 * reports / busy } else { 0.0 },
        }
    }
}

/// Where the machine's CPU went during a run, per report (or request).
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct CpuPerReport {
    pub(crate) cores: usize,
    /// Busy share of all cores over the run (1.0: every core busy throughout).
    pub(crate) machine_busy: f64,
    /// CPU µs per report of each process group; `other` is the rest of the
    /// machine's busy time (other processes, the kernel's own threads).
    pub(crate) micros_per_report: BTreeMap<String, f64>,
    /// PostgreSQL's CPU µs per report by whose connection its live
    /// processes served (`server`: its own background processes).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) postgresql_by_client: BTreeMap<String, f64>,
    /// The machine's busy CPU µs per report, all groups together.
    pub(crate) machine_micros_per_report: f64,
    /// Cores ÷ busy CPU time per report: the most reports per second this
    /// machine could take at this cost per report with every core busy.
    pub(crate) machine_bound_per_second: f64,
}

impl CpuPerReport {
    /// CPU µs per report of the process group `group` (0 when it was not seen).
    pub(crate) fn micros(&self, group: &str) -> f64 {
        self.micros_per_report.get(group).copied().unwrap_or(0.0)
    }

    /// One line; `per` is what the run counts (report, request).
    pub(crate) fn summary(&self, per: &str) -> String {
        let groups = self
            .micros_per_report
            .iter()
            .map(|(name, micros)| format!("{name} {micros:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "CPU µs per {per}: {groups}; all {:.0} → at most {:.0}/s on {} cores (busy {:.0} %)",
            self.machine_micros_per_report,
            self.machine_bound_per_second,
            self.cores,
            self.machine_busy * 100.0
        )
    }
}

impl Service {
    pub(crate) fn spawn(
        name: &str,
        command: &str,
        env: &[(String, String)],
        config: Option<&Path>,
        dir: &Path,
        url: String,
    ) -> anyhow::Result<Service> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let exe = std::env::current_exe().context("finding this executable")?;
        // `FLEETPATCH_BENCH_WRAP_COLLECTOR="valgrind --tool=dhat"`: the service
        // runs under that program (its allocations counted, say).
        let wrapper = std::env::var(format!("FLEETPATCH_BENCH_WRAP_{}", name.to_uppercase().replace('-', "_")))
            .ok()
            .filter(|w| !w.trim().is_empty());
        let mut cmd = match wrapper {
            Some(wrapper) => {
                let mut words = wrapper.split_whitespace();
                let mut cmd = Command::new(words.next().context("the wrapper names a program")?);
                cmd.args(words).arg(exe);
                cmd
            }
            None => Command::new(exe),
        };
        if let Some(config) = config {
            cmd.arg("--config").arg(config);
        }
        cmd.arg(command)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting the {name} process"))?;
        let pid = child.id().context("the child has a pid")?;
        Ok(Service { name: name.to_owned(), child, pid, url, log })
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub(crate) async fn wait_ready(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the {} process exited ({status}) while starting:\n{}", self.name, self.log_tail());
            }
            if let Ok(response) = http.get(format!("{}/readyz", self.url)).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the {} process was not ready within 60 s:\n{}", self.name, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn metrics(&self, http: &reqwest::Client) -> anyhow::Result<Metrics> {
        let text = http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .with_context(|| format!("scraping the {} process", self.name))?
            .text()
            .await?;
        Ok(Metrics::parse(&text))
    }

    pub(crate) fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.pid).unwrap_or(0.0)
    }

    pub(crate) fn peak_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmHWM:").unwrap_or(0)
    }

    /// SIGTERM, then waits for the drain (killed after 30 s).
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status();
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    eprintln!("warning: the {} process ended with {status}:\n{}", self.name, self.log_tail());
                }
            }
            Err(_) => {
                eprintln!("warning: the {} process did not drain within 30 s; killed", self.name);
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

/// Peak resident memory of each service, sampled every 100 ms, per phase.
#[derive(Clone, Default)]
pub(crate) struct Sampler {
    pub(crate) pids: Arc<Mutex<BTreeMap<String, u32>>>,
    pub(crate) peaks: Arc<Mutex<BTreeMap<String, u64>>>,
    pub(crate) current: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Sampler {
    pub(crate) fn watch(&self, service: &Service) {
        self.pids.lock().expect("sampler").insert(service.name.clone(), service.pid);
    }
    pub(crate) fn forget(&self, name: &str) {
        self.pids.lock().expect("sampler").remove(name);
    }
    /// The services watched now, by name.
    pub(crate) fn pids(&self) -> BTreeMap<String, u32> {
        self.pids.lock().expect("sampler").clone()
    }
    pub(crate) fn sample(&self) {
        let pids = self.pids.lock().expect("sampler").clone();
        let mut peaks = self.peaks.lock().expect("sampler");
        let mut current = self.current.lock().expect("sampler");
        for (name, pid) in pids {
            if let Some(rss) = proc_status_kib(pid, "VmRSS:") {
                let peak = peaks.entry(name.clone()).or_default();
                *peak = (*peak).max(rss);
                current.insert(name, rss);
            }
        }
    }
    pub(crate) fn start(&self, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
        let sampler = self.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                sampler.sample();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }
    /// The peaks since the last call, in MiB.
    pub(crate) fn take_peaks(&self) -> BTreeMap<String, f64> {
        self.sample();
        std::mem::take(&mut *self.peaks.lock().expect("sampler"))
            .into_iter()
            .map(|(k, v)| (k, v as f64 / 1024.0))
            .collect()
    }
    pub(crate) fn current_mib(&self, name: &str) -> f64 {
        self.sample();
        self.current.lock().expect("sampler").get(name).copied().unwrap_or(0) as f64 / 1024.0
    }
}

// ---------------------------------------------------------------- metrics text

/// Prometheus text exposition, as name{labels} → value.
#[derive(Debug, Default, Clone)]
pub(crate) struct Metrics(Vec<(String, String, f64)>);

impl Metrics {
    pub(crate) fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty()) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match series.find('{') {
                Some(brace) => (&series[..brace], series[brace..].to_owned()),
                None => (series, String::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Metrics(samples)
    }

    pub(crate) fn sum(&self, name: &str, label: &str) -> f64 {
        self.0.iter().filter(|(n, l, _)| n == name && l.contains(label)).map(|(_, _, v)| v).sum()
    }

    /// Cumulative bucket counts of a histogram, by upper bound.
    pub(crate) fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut out: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (n, labels, value) in &self.0 {
            if *n != bucket {
                continue;
            }
            let Some(le) = labels.split("le=\"").nth(1).and_then(|rest| rest.split('"').next()) else { continue };
            let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
            let entry = out.entry(bound.to_bits()).or_insert((bound, 0.0));
            entry.1 += value;
        }
        let mut buckets: Vec<(f64, f64)> = out.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }

    pub(crate) fn merge(mut self, other: Metrics) -> Metrics {
        self.0.extend(other.0);
        self
    }
}

/// The `q` quantile of the observations between two scrapes of a histogram,
/// interpolated linearly inside its bucket.
pub(crate) fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|(bound, count)| {
            let old = before.iter().find(|(b, _)| b == bound).map(|(_, c)| *c).unwrap_or(0.0);
            (*bound, count - old)
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (bound, cumulative) in counts {
        if cumulative >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let share = if cumulative > lower.1 { (rank - lower.1) / (cumulative - lower.1) } else { 1.0 };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, cumulative);
    }
    None
}

pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

// ---------------------------------------------------------------- the figures

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_read_from_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95054                95054                processes \n\
                      Max open files            20000                524288               files     \n\
                      Max locked memory         8388608              8388608              bytes     \n";
        assert_eq!(parse_open_files_limit(limits), Some(20_000), "the soft limit");
        let unlimited = "Max open files            unlimited            unlimited            files     \n";
        assert_eq!(parse_open_files_limit(unlimited), None);
        assert_eq!(parse_open_files_limit("Max processes 10 10 processes\n"), None);
        assert!(open_files_limit().is_some_and(|limit| limit > 0), "this process's own limit");
    }

    #[test]
    fn a_run_that_may_run_out_of_open_files_is_told_what_to_raise() {
        // 10,000 paced agents: both ends of each connection in this process.
        let shortfall = open_files_shortfall(10_000, 128, Some(20_000)).expect("20,000 files are too few");
        assert!(shortfall.contains("may open 20000 files"), "{shortfall}");
        assert!(shortfall.contains("ulimit -n 22048"), "{shortfall}");
        assert!(shortfall.contains("lower --collector-targets"), "{shortfall}");
        assert_eq!(open_files_shortfall(10_000, 128, Some(22_048)), None, "exactly enough");
        assert_eq!(open_files_shortfall(2_000, 128, Some(20_000)), None, "the usual run");
        // Without a paced run, the closed loop's senders count.
        let shortfall = open_files_shortfall(0, 2_000, Some(4_096)).expect("4,096 files are too few");
        assert!(shortfall.contains("lower --collector-clients"), "{shortfall}");
        assert_eq!(open_files_shortfall(10_000, 128, None), None, "no limit");
    }
}
