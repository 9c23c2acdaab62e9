//! Private OpenSSH `sshd` peers on loopback, for tests and benchmarks
//! (feature `test-support`).
//!
//! [`SshPeer::start`] runs one `sshd` on `127.0.0.1` on a free port, with
//! its own config, host key, `authorized_keys`, pid file, log and staging
//! directory, all in a temporary directory that goes away with the peer.
//! [`SshFleet::start`] starts many at once (for the end-to-end rollout and
//! the 100-target benchmark), sharing one pair of keys so the only per-peer
//! cost is the `sshd` process itself. Peers are stopped by their pid file,
//! never by name.
//!
//! These are real infrastructure: without `sshd` installed they **panic**
//! with the install command (`apt-get install -y openssh-server`); they never
//! skip. The login user is root with key authentication (the test machines
//! run as root); password tests use a dedicated local account
//! ([`PASSWORD_USER`]) that [`SshPeerOptions::password_auth`] creates.

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetpatch_transport::{Credential, Secret, TargetSpec};

use crate::{HostKeyPolicy, SshOptions, SshTransport};

/// Local account the password tests log in as (created on demand).
pub const PASSWORD_USER: &str = "fpsshtest";
/// Its password (a test fixture, on loopback-only sshd peers).
pub const PASSWORD: &str = "fleetpatch-test-password-1";
/// Target label that gives a target its own staging root.
pub const STAGING_ROOT_LABEL: &str = crate::STAGING_ROOT_LABEL;

/// Finds `sshd`, or panics with how to install it: tests against real
/// infrastructure fail loudly, they never skip.
pub fn require_sshd() -> PathBuf {
    for candidate in ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"] {
        if Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    if let Ok(path) = which("sshd") {
        return path;
    }
    panic!(
        "OpenSSH sshd is required for the ssh transport tests and was not found{}: \
         install it with `apt-get install -y openssh-server` (.ci/run does this)",
        if std::env::var("CI").as_deref() == Ok("true") { " on this CI machine" } else { "" }
    );
}

fn which(program: &str) -> io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{program} not found in PATH")))
}

fn run(command: &mut Command) -> io::Result<std::process::Output> {
    let output = command.output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        )));
    }
    Ok(output)
}

/// One `ssh-keygen` key pair.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private_key_path: PathBuf,
    /// The private key file's text (OpenSSH format).
    pub private_key_pem: String,
    /// `ALGORITHM BASE64 COMMENT`.
    pub public_key: String,
}

impl KeyPair {
    /// Generates a key with `ssh-keygen -t TYPE` into `dir/name`.
    pub fn generate(dir: &Path, name: &str, key_type: &str, passphrase: &str) -> io::Result<KeyPair> {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("pub"));
        let mut command = Command::new("ssh-keygen");
        command.args(["-q", "-t", key_type, "-N", passphrase, "-C", name, "-f"]).arg(&path);
        if key_type == "rsa" {
            command.args(["-b", "2048"]);
        }
        run(&mut command)?;
        Ok(KeyPair {
            private_key_pem: std::fs::read_to_string(&path)?,
            public_key: std::fs::read_to_string(dir.join(format!("{name}.pub")))?.trim().to_owned(),
            private_key_path: path,
        })
    }
}

/// The keys a peer (or a whole fleet) uses: the server's host key and the
/// client key in its `authorized_keys`.
#[derive(Debug)]
pub struct PeerKeys {
    _dir: tempfile::TempDir,
    pub host: KeyPair,
    pub client: KeyPair,
}

impl PeerKeys {
    /// Generates an ed25519 host key and an ed25519 client key.
    pub fn generate() -> io::Result<Arc<PeerKeys>> {
        let dir = tempfile::Builder::new().prefix("fleetpatch-ssh-keys-").tempdir()?;
        let host = KeyPair::generate(dir.path(), "ssh_host_ed25519_key", "ed25519", "")?;
        let client = KeyPair::generate(dir.path(), "id_ed25519", "ed25519", "")?;
        Ok(Arc::new(PeerKeys { _dir: dir, host, client }))
    }
}

/// How a peer is set up.
#[derive(Debug, Clone, Default)]
pub struct SshPeerOptions {
    /// Also accept passwords (`PasswordAuthentication yes`, `UsePAM no`) and
    /// make sure [`PASSWORD_USER`] exists with [`PASSWORD`].
    pub password_auth: bool,
    /// Keys to use (shared by a fleet); generated when `None`.
    pub keys: Option<Arc<PeerKeys>>,
    /// Extra public keys for `authorized_keys`.
    pub extra_authorized_keys: Vec<String>,
    /// Give the peer its own dpkg database, so package installs and the
    /// `dpkg` detection rule act on this "machine" and not on the host
    /// running the tests: an empty dpkg root at [`SshPeer::dpkg_root`], and
    /// sshd sets `DPKG_ADMINDIR` (read by `dpkg` and `dpkg-query`) and
    /// [`DPKG_ROOT_VAR`] in every session, which an installer's arguments
    /// use as `--root="$FLEETPATCH_TEST_DPKG_ROOT"`.
    pub dpkg_root: bool,
    /// Give the peer a boot of its own, so that [`SshPeer::reboot`] is a
    /// reboot as the worker sees it: sshd starts in a mount namespace in
    /// which `/proc/sys/kernel/random/boot_id` is a file of the peer's that
    /// each reboot gives a new id. Sessions also get [`PEER_DIR_VAR`], so a
    /// test's reboot command can ask for the reboot
    /// ([`SshPeer::reboot_requested`]).
    pub own_boot: bool,
}

/// The lines a stand-in agent script (a test's, in place of
/// `fleetpatch-agent`) starts with, so it honours `run --plan FILE
/// --detach PIDFILE` as the agent does: it starts itself again without
/// `--detach` in a session of its own, whose pid it writes to PIDFILE,
/// and returns once that is written (exit 1 if it never is).
pub const STAND_IN_DETACH: &str = "if [ \"$4\" = --detach ]; then\n\
     \x20 setsid /bin/sh -c 'echo $$ > \"$1\"; shift; exec \"$@\"' stand-in \"$5\" \"$0\" \"$1\" \"$2\" \"$3\" </dev/null &\n\
     \x20 i=0; while [ ! -s \"$5\" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n\
     \x20 [ -s \"$5\" ]; exit $?\n\
     fi\n";

/// Environment variable holding a peer's directory (with
/// [`SshPeerOptions::own_boot`]), set by sshd in every session.
pub const PEER_DIR_VAR: &str = "FLEETPATCH_TEST_PEER_DIR";

/// The file whose presence in a peer's directory asks [`SshPeer::reboot`]
/// for a reboot: `touch "$FLEETPATCH_TEST_PEER_DIR/reboot-requested"`.
pub const REBOOT_REQUEST: &str = "reboot-requested";

/// The kernel's boot id as the peer shows it, for its `boot`-th boot.
fn peer_boot_id(port: u16, boot: u32) -> String {
    format!("{port:08x}-0000-4000-8000-{boot:012x}")
}

/// The file bind-mounted over the kernel's boot id in the peer's sshd.
const BOOT_ID_FILE: &str = "boot_id";

/// Environment variable holding a peer's dpkg root (with
/// [`SshPeerOptions::dpkg_root`]), set by sshd in every session.
pub const DPKG_ROOT_VAR: &str = "FLEETPATCH_TEST_DPKG_ROOT";

/// An empty dpkg root: `var/lib/dpkg` with `status`, `info/`, `updates/`, `triggers/`.
fn create_dpkg_root(root: &Path) -> io::Result<()> {
    let admin = root.join("var/lib/dpkg");
    for dir in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(dir))?;
    }
    std::fs::write(admin.join("status"), "")?;
    Ok(())
}

/// Whether sshd can be started with an empty `/root/.bashrc` (see
/// `SshPeer::spawn`): there is one to hide, and `unshare --mount` works here.
fn quiet_root_profile_possible() -> bool {
    static POSSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *POSSIBLE.get_or_init(|| {
        Path::new("/root/.bashrc").is_file()
            && Command::new("unshare")
                .args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
                .arg("mount --bind /dev/null /root/.bashrc && test ! -s /root/.bashrc")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
    })
}

/// One private `sshd` on `127.0.0.1`. Stopped (by pid file) on drop.
#[derive(Debug)]
pub struct SshPeer {
    dir: tempfile::TempDir,
    port: u16,
    keys: Arc<PeerKeys>,
    pid_file: PathBuf,
    log_file: PathBuf,
    known_hosts: PathBuf,
    staging_root: PathBuf,
    stopped: bool,
    /// With [`SshPeerOptions::own_boot`]: how many times the peer booted.
    boots: Option<u32>,
}

/// A port that was free a moment ago (sshd binds it next; a lost race is
/// retried by [`SshPeer::start_with`]).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Creates the password test account once (concurrent test processes are
/// serialized with `flock`).
pub fn ensure_password_user() -> io::Result<()> {
    let script = format!(
        "id -u {user} >/dev/null 2>&1 || useradd --no-create-home --home-dir /nonexistent --shell /bin/sh {user}\n\
         echo '{user}:{password}' | chpasswd\n",
        user = PASSWORD_USER,
        password = PASSWORD,
    );
    run(Command::new("flock").args(["/tmp/fleetpatch-ssh-test-user.lock", "/bin/sh", "-c", &script])).map(|_| ())
}

/// `/run/sshd`: Debian's sshd refuses to start without its privilege
/// separation directory.
fn ensure_privsep_dir() -> io::Result<()> {
    let dir = Path::new("/run/sshd");
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

impl SshPeer {
    /// A peer with fresh keys and key authentication only.
    pub fn start() -> io::Result<SshPeer> {
        Self::start_with(SshPeerOptions::default())
    }

    /// A peer set up as `options` says.
    pub fn start_with(options: SshPeerOptions) -> io::Result<SshPeer> {
        let sshd = require_sshd();
        ensure_privsep_dir()?;
        if options.password_auth {
            ensure_password_user()?;
        }
        let keys = match options.keys.clone() {
            Some(keys) => keys,
            None => PeerKeys::generate()?,
        };
        let mut last_error = None;
        for _ in 0..5 {
            let mut peer = Self::prepare(&keys, &options)?;
            let mut child = peer.spawn(&sshd)?;
            match peer.wait_started(&mut child) {
                Ok(()) => return Ok(peer),
                Err(error) => {
                    peer.stopped = true;
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("sshd did not start")))
    }

    /// Writes the peer's directory and config (port chosen, sshd not started).
    fn prepare(keys: &Arc<PeerKeys>, options: &SshPeerOptions) -> io::Result<SshPeer> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("fleetpatch-sshd-").tempdir()?;
        // Readable by the password test account, whose staging root is in here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let port = free_port()?;
        let staging_root = dir.path().join("staging");
        std::fs::create_dir(&staging_root)?;
        std::fs::set_permissions(&staging_root, std::fs::Permissions::from_mode(0o1777))?;
        let host_key = dir.path().join("ssh_host_ed25519_key");
        std::fs::copy(&keys.host.private_key_path, &host_key)?;
        std::fs::set_permissions(&host_key, std::fs::Permissions::from_mode(0o600))?;
        let mut authorized = keys.client.public_key.clone();
        for extra in &options.extra_authorized_keys {
            authorized.push('\n');
            authorized.push_str(extra);
        }
        authorized.push('\n');
        std::fs::write(dir.path().join("authorized_keys"), authorized)?;
        let pid_file = dir.path().join("sshd.pid");
        let log_file = dir.path().join("sshd.log");
        let config = format!(
            "ListenAddress 127.0.0.1\n\
             HostKey {host_key}\n\
             PidFile {pid_file}\n\
             AuthorizedKeysFile {authorized}\n\
             PermitRootLogin prohibit-password\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication {password}\n\
             KbdInteractiveAuthentication no\n\
             UsePAM no\n\
             StrictModes no\n\
             UseDNS no\n\
             MaxStartups 200\n\
             MaxSessions 200\n\
             MaxAuthTries 10\n\
             LogLevel VERBOSE\n\
             Subsystem sftp internal-sftp\n",
            host_key = host_key.display(),
            pid_file = pid_file.display(),
            authorized = dir.path().join("authorized_keys").display(),
            password = if options.password_auth { "yes" } else { "no" },
        );
        std::fs::write(dir.path().join("sshd_config"), config)?;
        // sshd takes the first SetEnv line only: every variable goes on one.
        let mut set_env = Vec::new();
        if options.dpkg_root {
            let root = dir.path().join("dpkg-root");
            create_dpkg_root(&root)?;
            set_env.push(format!("DPKG_ADMINDIR={}", root.join("var/lib/dpkg").display()));
            set_env.push(format!("{DPKG_ROOT_VAR}={}", root.display()));
        }
        let boots = if options.own_boot {
            if !quiet_root_profile_possible() {
                return Err(io::Error::other("a peer's own boot needs `unshare --mount` (run as root)"));
            }
            set_env.push(format!("{PEER_DIR_VAR}={}", dir.path().display()));
            std::fs::write(dir.path().join(BOOT_ID_FILE), format!("{}\n", peer_boot_id(port, 1)))?;
            Some(1)
        } else {
            None
        };
        if !set_env.is_empty() {
            let mut config = std::fs::OpenOptions::new().append(true).open(dir.path().join("sshd_config"))?;
            writeln!(config, "SetEnv {}", set_env.join(" "))?;
        }
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {}\n", keys.host.public_key))?;
        Ok(SshPeer {
            dir,
            port,
            keys: keys.clone(),
            pid_file,
            log_file,
            known_hosts,
            staging_root,
            stopped: true,
            boots,
        })
    }

    /// Starts sshd (it daemonizes once it listens).
    ///
    /// The peers log in as root, and Debian's bash sources `~/.bashrc` for
    /// every command sshd runs: on a build machine whose root profile runs
    /// `pyenv init` that costs ~0.2 CPU-s per command, more than the
    /// deployment itself, and no real target pays it. So where it can, sshd
    /// starts in a mount namespace of its own in which `/root/.bashrc` is
    /// empty (a bind mount of `/dev/null` that only this sshd and its
    /// sessions see); elsewhere it starts as is.
    fn spawn(&mut self, sshd: &Path) -> io::Result<std::process::Child> {
        let mut command = if quiet_root_profile_possible() {
            let mut command = Command::new("unshare");
            let boot_id = match self.boots {
                Some(_) => format!(
                    "mount --bind '{}' /proc/sys/kernel/random/boot_id || exit 1; ",
                    self.dir.path().join(BOOT_ID_FILE).display()
                ),
                None => String::new(),
            };
            command
                .args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
                .arg(format!("mount --bind /dev/null /root/.bashrc 2>/dev/null; {boot_id}exec \"$0\" \"$@\""));
            command.arg(sshd);
            command
        } else {
            Command::new(sshd)
        };
        let child = command
            .arg("-f")
            .arg(self.dir.path().join("sshd_config"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-E")
            .arg(&self.log_file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        self.stopped = false;
        Ok(child)
    }

    /// Waits for the daemonizing parent to exit and the pid file to appear.
    fn wait_started(&mut self, child: &mut std::process::Child) -> io::Result<()> {
        let status = child.wait()?;
        if !status.success() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = io::Read::read_to_string(&mut pipe, &mut stderr);
            }
            return Err(io::Error::other(format!(
                "sshd on port {} exited with {status}: {stderr}{}",
                self.port,
                self.log()
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.pid().is_some() && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(io::Error::other(format!("sshd on port {} did not come up: {}", self.port, self.log())))
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The peer's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn keys(&self) -> &Arc<PeerKeys> {
        &self.keys
    }

    /// A `known_hosts` file holding this peer's host key.
    pub fn known_hosts_file(&self) -> &Path {
        &self.known_hosts
    }

    /// This peer's own staging root (under its temporary directory).
    pub fn staging_root(&self) -> &Path {
        &self.staging_root
    }

    /// This peer's own dpkg root (meaningful with [`SshPeerOptions::dpkg_root`]).
    pub fn dpkg_root(&self) -> PathBuf {
        self.dir.path().join("dpkg-root")
    }

    /// Where files of `deployment_id` land on this peer.
    pub fn staging_dir(&self, deployment_id: &str) -> PathBuf {
        self.staging_root.join(deployment_id)
    }

    /// root with the peer's client key.
    pub fn key_credential(&self) -> Credential {
        Credential::PrivateKey {
            username: "root".into(),
            key_pem: Secret::new(self.keys.client.private_key_pem.clone()),
            passphrase: None,
        }
    }

    /// [`PASSWORD_USER`] with [`PASSWORD`] (needs `password_auth`).
    pub fn password_credential(&self) -> Credential {
        Credential::Password { username: PASSWORD_USER.into(), password: Secret::new(PASSWORD) }
    }

    /// This peer as a target: root, key authentication, its own staging root.
    pub fn target(&self) -> TargetSpec {
        self.target_with(Some(self.key_credential()))
    }

    /// This peer as a target with another credential.
    pub fn target_with(&self, credential: Option<Credential>) -> TargetSpec {
        TargetSpec {
            target_id: uuid_from_port(self.port),
            host: self.host().into(),
            port: Some(self.port),
            labels: BTreeMap::from([(STAGING_ROOT_LABEL.to_owned(), self.staging_root.display().to_string())]),
            credential,
        }
    }

    /// Transport options for this peer: strict host keys against its
    /// `known_hosts`, its staging root, short timeouts.
    pub fn options(&self) -> SshOptions {
        SshOptions {
            host_key_policy: HostKeyPolicy::Strict,
            known_hosts_file: Some(self.known_hosts.clone()),
            staging_root: self.staging_root.display().to_string(),
            connect_timeout_seconds: 10,
            command_timeout_seconds: 60,
            ..SshOptions::default()
        }
    }

    pub fn transport(&self) -> SshTransport {
        SshTransport::new(self.options()).expect("test peer options are valid")
    }

    /// The sshd log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The processes sshd started for the connections open now (every
    /// descendant of the listener: the per-connection sshd, its sessions).
    pub fn connection_pids(&self) -> Vec<i32> {
        let Some(listener) = self.pid() else { return Vec::new() };
        let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                // `pid (comm) state ppid ...`; comm may hold spaces.
                let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
                Some((pid, ppid))
            })
            .collect();
        let mut found = vec![listener];
        let mut index = 0;
        while index < found.len() {
            let parent = found[index];
            found.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(pid, _)| *pid));
            index += 1;
        }
        found.remove(0);
        found
    }

    /// Sends `signal` (`STOP`, `CONT`, `KILL`, ...) to every process of the
    /// open connections ([`Self::connection_pids`]); returns how many.
    pub fn signal_connections(&self, signal: &str) -> usize {
        let pids = self.connection_pids();
        for pid in &pids {
            let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
        }
        pids.len()
    }

    /// Starts sshd again after [`SshPeer::stop`], on the same port with the
    /// same keys and files: the machine is back.
    pub fn start_again(&mut self) -> io::Result<()> {
        if !self.stopped {
            return Ok(());
        }
        let mut child = self.spawn(&require_sshd())?;
        self.wait_started(&mut child)
    }

    /// Whether a session asked for a reboot ([`REBOOT_REQUEST`]).
    pub fn reboot_requested(&self) -> bool {
        self.dir.path().join(REBOOT_REQUEST).exists()
    }

    /// The boot id the peer shows (with [`SshPeerOptions::own_boot`]).
    pub fn boot_id(&self) -> Option<String> {
        self.boots.map(|boot| peer_boot_id(self.port, boot))
    }

    /// A reboot as the worker sees it: every connection is cut, sshd stops,
    /// stays down for `down`, and starts again with a new boot id.
    /// Needs [`SshPeerOptions::own_boot`].
    pub fn reboot(&mut self, down: Duration) -> io::Result<()> {
        let Some(boots) = self.boots else {
            return Err(io::Error::other("this peer has no boot of its own (SshPeerOptions::own_boot)"));
        };
        let _ = std::fs::remove_file(self.dir.path().join(REBOOT_REQUEST));
        self.signal_connections("KILL");
        self.stop();
        std::thread::sleep(down);
        let boots = boots + 1;
        std::fs::write(self.dir.path().join(BOOT_ID_FILE), format!("{}\n", peer_boot_id(self.port, boots)))?;
        self.boots = Some(boots);
        self.start_again()
    }

    /// Stops sshd by its pid file and waits for the port to close.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

impl Drop for SshPeer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A stable target id per peer (its port), so logs can be matched.
fn uuid_from_port(port: u16) -> uuid::Uuid {
    uuid::Uuid::from_u128(0x5348_0000_0000_4000_8000_0000_0000_0000 | u128::from(port))
}

/// Many peers started together, sharing keys and one `known_hosts` file.
#[derive(Debug)]
pub struct SshFleet {
    peers: Vec<SshPeer>,
    keys: Arc<PeerKeys>,
    dir: tempfile::TempDir,
    known_hosts: PathBuf,
}

impl SshFleet {
    /// Starts `count` sshd peers (in parallel: each `sshd` daemonizes on its
    /// own, so the start cost is about one process start per peer).
    pub fn start(count: usize) -> io::Result<SshFleet> {
        Self::start_with(count, SshPeerOptions::default())
    }

    /// Starts `count` peers set up as `options` says (its `keys` are
    /// replaced by one pair generated for the fleet).
    pub fn start_with(count: usize, options: SshPeerOptions) -> io::Result<SshFleet> {
        let sshd = require_sshd();
        ensure_privsep_dir()?;
        if options.password_auth {
            ensure_password_user()?;
        }
        let keys = PeerKeys::generate()?;
        let options = SshPeerOptions { keys: Some(keys.clone()), ..options };
        let mut peers = Vec::with_capacity(count);
        let mut pending = Vec::new();
        for _ in 0..count {
            let mut peer = SshPeer::prepare(&keys, &options)?;
            let child = peer.spawn(&sshd)?;
            pending.push((peer, child));
        }
        for (mut peer, mut child) in pending {
            match peer.wait_started(&mut child) {
                Ok(()) => peers.push(peer),
                Err(_) => {
                    // Lost the race for its port: start this one again on another.
                    peer.stopped = true;
                    peers.push(SshPeer::start_with(options.clone())?);
                }
            }
        }
        let dir = tempfile::Builder::new().prefix("fleetpatch-ssh-fleet-").tempdir()?;
        let known_hosts = dir.path().join("known_hosts");
        let mut file = std::fs::File::create(&known_hosts)?;
        for peer in &peers {
            writeln!(file, "[127.0.0.1]:{} {}", peer.port, keys.host.public_key)?;
        }
        Ok(SshFleet { peers, keys, dir, known_hosts })
    }

    pub fn peers(&self) -> &[SshPeer] {
        &self.peers
    }

    /// One peer, to stop and start again.
    pub fn peer_mut(&mut self, index: usize) -> &mut SshPeer {
        &mut self.peers[index]
    }

    pub fn keys(&self) -> &Arc<PeerKeys> {
        &self.keys
    }

    /// A `known_hosts` file with every peer.
    pub fn known_hosts_file(&self) -> &Path {
        &self.known_hosts
    }

    /// A scratch directory that lives as long as the fleet.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Every peer as a target (each with its own staging root label).
    pub fn targets(&self) -> Vec<TargetSpec> {
        self.peers.iter().map(SshPeer::target).collect()
    }

    /// Transport options for the whole fleet (shared `known_hosts`; each
    /// target's staging root comes from its label).
    pub fn options(&self) -> SshOptions {
        SshOptions {
            host_key_policy: HostKeyPolicy::Strict,
            known_hosts_file: Some(self.known_hosts.clone()),
            staging_root: self.dir.path().join("default-staging").display().to_string(),
            connect_timeout_seconds: 10,
            command_timeout_seconds: 60,
            ..SshOptions::default()
        }
    }

    pub fn transport(&self) -> SshTransport {
        SshTransport::new(self.options()).expect("test fleet options are valid")
    }
}
