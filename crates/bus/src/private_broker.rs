//! A private RabbitMQ node for the tests that stop and start a broker: its
//! own node name, ports on 127.0.0.1 and data directory, so the shared
//! broker other tests use is never restarted. Started from Debian's
//! `rabbitmq-server` (as the `rabbitmq` user when run as root, which the
//! server's wrapper script does by itself); stopped and removed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A RabbitMQ node of this test's own.
pub struct PrivateBroker {
    node: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

impl PrivateBroker {
    /// Starts a node and waits until it accepts connections. Panics with
    /// what is missing when RabbitMQ is not installed (tests never skip).
    pub fn start() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let node = format!("fp-test-{}-{n}@localhost", std::process::id());
        let dir = std::env::temp_dir().join(format!("fp-rabbit-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("broker directory");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        // The server runs as `rabbitmq` when started by root.
        let _ = Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(&dir).status();
        let broker = Self { node, port: free_port(), dist_port: free_port(), dir };
        broker.launch();
        broker
    }

    fn launch(&self) {
        let log = std::fs::File::create(self.dir.join("server.out")).expect("server log");
        let spawned = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn();
        if let Err(error) = spawned {
            panic!("cannot start rabbitmq-server ({error}); install Debian's rabbitmq-server (.ci/run does)");
        }
        // `await_startup` fails at once while the VM has not yet registered
        // its node name (the first seconds of a boot), so ask until the
        // node answers, then wait for the broker inside it.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.try_ctl(&["await_startup", "--timeout", "60"]) {
            assert!(
                Instant::now() < deadline,
                "the private broker {} did not start within 120 s; see {}",
                self.node,
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        self.wait_for_port(true, Duration::from_secs(60));
    }

    fn try_ctl(&self, args: &[&str]) -> bool {
        Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("rabbitmqctl runs")
            .success()
    }

    fn ctl(&self, args: &[&str]) {
        assert!(self.try_ctl(args), "rabbitmqctl {args:?} on {} failed; see {}", self.node, self.dir.display());
    }

    fn wait_for_port(&self, open: bool, limit: Duration) {
        let started = Instant::now();
        while started.elapsed() < limit {
            let answers = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if answers == open {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the private broker's port {} did not {}", self.port, if open { "open" } else { "close" });
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` (guest may log in from loopback).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl stop_app`: the node closes every connection and stops serving.
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
        self.wait_for_port(false, Duration::from_secs(30));
    }

    /// `rabbitmqctl start_app`.
    pub fn start_app(&self) {
        self.ctl(&["start_app"]);
        self.wait_for_port(true, Duration::from_secs(60));
    }

    /// Stops the whole node (the Erlang VM exits); [`PrivateBroker::start_again`] brings it back
    /// with its data (durable queues and their messages survive).
    pub fn stop(&self) {
        self.ctl(&["stop"]);
        self.wait_for_port(false, Duration::from_secs(30));
    }

    pub fn start_again(&self) {
        self.launch();
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
