//! A private PostgreSQL server for the tests that restart a database: its
//! own data directory, port on 127.0.0.1 and socket directory, so the shared
//! server other tests use is never restarted. Debian's PostgreSQL binaries
//! (`/usr/lib/postgresql/<version>/bin`), run as the `postgres` user when
//! the test runs as root (PostgreSQL refuses to run as root); trust
//! authentication on loopback only. Stopped and removed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A PostgreSQL server of this test's own.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Server settings beyond the defaults below (`-c NAME=VALUE`).
    settings: Vec<(String, String)>,
}

fn postgres_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|bin| bin.join("pg_ctl").exists());
    versions.sort();
    versions.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries under /usr/lib/postgresql; install Debian's postgresql (.ci/run does)")
    })
}

impl PrivatePostgres {
    /// Creates a cluster and starts it.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Creates a cluster and starts it with these settings as well
    /// (`shared_preload_libraries`, say).
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("fp-postgres-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("database directory");
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc_geteuid() } == 0;
        if as_postgres {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&dir).status();
            assert!(status.is_ok_and(|s| s.success()), "chown of {} to postgres", dir.display());
        }
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port");
        let settings = settings.iter().map(|(name, value)| ((*name).to_owned(), (*value).to_owned())).collect();
        let server = Self { bin: postgres_bin(), dir, port, as_postgres, settings };
        server.run("initdb", &["-D", &server.data(), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]);
        server.pg_ctl(&["start", "-w", "-t", "60"]);
        server
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        let output = command.args(args).stdin(Stdio::null()).output().expect("PostgreSQL tool runs");
        assert!(
            output.status.success(),
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        for (name, value) in &self.settings {
            options.push_str(&format!(" -c {name}={value}"));
        }
        let log = self.dir.join("server.log").display().to_string();
        let mut full = vec!["-D".to_owned(), self.data(), "-o".to_owned(), options, "-l".to_owned(), log];
        full.extend(args.iter().map(|a| (*a).to_owned()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        self.run("pg_ctl", &full);
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast: open sessions are cut, as in a crash of the connections).
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w"]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }

    /// Stops and starts, waiting until it accepts connections; returns how long it was away.
    pub fn restart(&self) -> Duration {
        let started = Instant::now();
        self.pg_ctl(&["restart", "-m", "fast", "-w", "-t", "60"]);
        started.elapsed()
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "stop", "-m", "immediate"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if self.as_postgres {
            let _ = Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .args(["-D", &self.data(), "stop", "-m", "immediate"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
