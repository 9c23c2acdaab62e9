//! A private Samba `smbd` on loopback, the Windows-side peer of integration
//! tests (feature `test-support`; other crates' tests may use it too).
//!
//! [`SambaPeer::start`] writes a config whose every directory lives in a
//! fresh temp dir, adds the user `root` (mapped from `Administrator`) with
//! `smbpasswd`, starts `samba-dcerpcd` (RPC helpers for winreg/svcctl) and
//! `smbd` on a free port, and waits until the port accepts connections.
//! Dropping the peer stops both daemons by the pids in their pid files
//! (never by name) and removes the temp dir.
//!
//! When the binaries are missing it returns an error saying what to
//! install; tests must turn that into a failure, never a skip. With
//! `CI=true` in the environment, [`SambaPeer::start_or_panic`] panics with
//! that message.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::smb::{Credentials, SmbOptions, SmbSession};

/// The user tests log on as.
pub const ADMIN_USER: &str = "Administrator";
/// Its password.
pub const ADMIN_PASSWORD: &str = "Fleetpatch-Test-1";

const SMBD: &str = "/usr/sbin/smbd";
const SAMBA_DCERPCD: &str = "/usr/libexec/samba/samba-dcerpcd";
const SMBPASSWD: &str = "/usr/bin/smbpasswd";
const NET: &str = "/usr/bin/net";

/// What to install when Samba is missing.
pub const INSTALL_HINT: &str = "install the Samba test peer with `apt-get install -y samba smbclient python3-impacket`";

/// A `.reg` file (for [`SambaPeer::import_registry`]) with the keys a
/// Windows probe reads beyond what Samba has: `PROCESSOR_ARCHITECTURE` =
/// `AMD64`, an Uninstall key per hotfix in `uninstall`, and a Component
/// Based Servicing package per `(package name, CurrentState)`.
pub fn windows_registry_seed(uninstall: &[&str], cbs_packages: &[(&str, u32)]) -> String {
    const HKLM: &str = "HKEY_LOCAL_MACHINE";
    const CURRENT_VERSION: &str = "SOFTWARE\\Microsoft\\Windows\\CurrentVersion";
    let mut text = format!(
        "Windows Registry Editor Version 5.00\n\n[{HKLM}\\SYSTEM\\CurrentControlSet\\Control\\Session Manager\\Environment]\n\
         \"PROCESSOR_ARCHITECTURE\"=\"AMD64\"\n\n"
    );
    for kb in uninstall {
        text.push_str(&format!(
            "[{HKLM}\\{CURRENT_VERSION}\\Uninstall\\{kb}]\n\"DisplayName\"=\"Security Update for Windows ({kb})\"\n\n"
        ));
    }
    for (package, state) in cbs_packages {
        text.push_str(&format!(
            "[{HKLM}\\{CURRENT_VERSION}\\Component Based Servicing\\Packages\\{package}]\n\"CurrentState\"=dword:{state:08x}\n\n"
        ));
    }
    text
}

/// A running private Samba server.
#[derive(Debug)]
pub struct SambaPeer {
    directory: tempfile::TempDir,
    config: PathBuf,
    address: SocketAddr,
    /// What `C$` and `ADMIN$` serve.
    share: PathBuf,
}

fn harness(message: impl Into<String>) -> Error {
    Error::Harness(message.into())
}

fn free_loopback_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|error| harness(format!("no free loopback port: {error}")))?;
    let port = listener.local_addr().map_err(|error| harness(error.to_string()))?.port();
    Ok(port)
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| harness(format!("{what}: cannot run: {error}; {INSTALL_HINT}")))?;
    if !output.status.success() {
        return Err(harness(format!(
            "{what} failed with {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(())
}

impl SambaPeer {
    /// Whether the Samba binaries this harness needs are installed.
    pub fn binaries_present() -> bool {
        [SMBD, SAMBA_DCERPCD, SMBPASSWD, NET].iter().all(|path| Path::new(path).exists())
    }

    /// Starts a peer, or panics with a message that says what is missing.
    pub fn start_or_panic() -> SambaPeer {
        match SambaPeer::start() {
            Ok(peer) => peer,
            Err(error) => {
                let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
                panic!("the Samba test peer is required{}: {error}", if in_ci { " in CI" } else { "" })
            }
        }
    }

    /// Starts smbd and samba-dcerpcd on a free loopback port; `C$` and
    /// `ADMIN$` serve a directory of the peer's own.
    pub fn start() -> Result<SambaPeer> {
        Self::start_serving(None)
    }

    /// Like [`SambaPeer::start`], with `C$` and `ADMIN$` serving `c_drive`
    /// (a Wine prefix's `drive_c`, so that what is staged over SMB is where
    /// Wine runs it).
    pub fn start_serving_c_drive(c_drive: &Path) -> Result<SambaPeer> {
        if !c_drive.is_dir() {
            return Err(harness(format!("{} is not a directory to serve as C$", c_drive.display())));
        }
        Self::start_serving(Some(c_drive.to_path_buf()))
    }

    fn start_serving(c_drive: Option<PathBuf>) -> Result<SambaPeer> {
        if !Self::binaries_present() {
            return Err(harness(format!(
                "Samba is not installed ({SMBD}, {SAMBA_DCERPCD}, {SMBPASSWD}, {NET}); {INSTALL_HINT}"
            )));
        }
        let directory = tempfile::Builder::new()
            .prefix("fleetpatch-samba-")
            .tempdir()
            .map_err(|error| harness(format!("temp dir: {error}")))?;
        let root = directory.path().to_path_buf();
        for sub in ["pid", "lock", "state", "cache", "private", "ncalrpc", "bind-dns", "log", "share"] {
            std::fs::create_dir_all(root.join(sub)).map_err(|error| harness(format!("creating {sub}: {error}")))?;
        }
        // smbd wants its private dir closed to others.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o700));
        }
        std::fs::write(root.join("users.map"), "root = Administrator\n")
            .map_err(|error| harness(format!("username map: {error}")))?;

        // The port is free now; a race with another process is possible but
        // rare, and shows up as a start failure naming the port.
        let port = free_loopback_port()?;
        let path = |sub: &str| root.join(sub).display().to_string();
        let share = c_drive.unwrap_or_else(|| root.join("share"));
        let config = format!(
            "[global]\n\
             server role = standalone server\n\
             workgroup = FLEETPATCH\n\
             netbios name = FLEETPATCHTEST\n\
             interfaces = 127.0.0.1\n\
             bind interfaces only = yes\n\
             smb ports = {port}\n\
             disable netbios = yes\n\
             server min protocol = SMB2_02\n\
             ntlm auth = ntlmv2-only\n\
             passdb backend = tdbsam:{private}/passdb.tdb\n\
             map to guest = never\n\
             username map = {root}/users.map\n\
             load printers = no\n\
             printing = bsd\n\
             printcap name = /dev/null\n\
             pid directory = {pid}\n\
             lock directory = {lock}\n\
             state directory = {state}\n\
             cache directory = {cache}\n\
             private dir = {private}\n\
             ncalrpc dir = {ncalrpc}\n\
             binddns dir = {binddns}\n\
             log file = {log}/log.%m\n\
             max log size = 10000\n\
             log level = 1\n\
             rpc start on demand helpers = no\n\
             \n\
             [ADMIN$]\n\
             path = {share}\n\
             read only = no\n\
             browseable = no\n\
             \n\
             [C$]\n\
             path = {share}\n\
             read only = no\n\
             browseable = no\n",
            private = path("private"),
            root = root.display(),
            pid = path("pid"),
            lock = path("lock"),
            state = path("state"),
            cache = path("cache"),
            ncalrpc = path("ncalrpc"),
            binddns = path("bind-dns"),
            log = path("log"),
            share = share.display(),
        );
        let config_path = root.join("smb.conf");
        std::fs::write(&config_path, config).map_err(|error| harness(format!("writing smb.conf: {error}")))?;

        add_user_with_stdin(&config_path)?;

        let peer =
            SambaPeer { directory, config: config_path, address: SocketAddr::from(([127, 0, 0, 1], port)), share };
        run(Command::new(SAMBA_DCERPCD).args(["-D", "--libexec-rpcds", "-s"]).arg(&peer.config), "samba-dcerpcd")?;
        peer.wait_for_rpc_helpers(Duration::from_secs(20))?;
        run(Command::new(SMBD).args(["-D", "-s"]).arg(&peer.config), "smbd")?;
        peer.wait_for_port(Duration::from_secs(20))?;
        Ok(peer)
    }

    /// samba-dcerpcd forks its helpers and they create their named-pipe
    /// sockets a moment later; a pipe opened before gets
    /// STATUS_OBJECT_NAME_NOT_FOUND.
    fn wait_for_rpc_helpers(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let sockets: Vec<PathBuf> =
            ["winreg", "svcctl"].iter().map(|pipe| self.directory.path().join("ncalrpc/np").join(pipe)).collect();
        loop {
            let ready = sockets.iter().all(|socket| std::os::unix::net::UnixStream::connect(socket).is_ok());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(harness(format!(
                    "samba-dcerpcd did not serve winreg and svcctl within {timeout:?}; logs in {}",
                    self.log_directory().display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for_port(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect_timeout(&self.address, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(harness(format!(
                    "smbd did not open {} within {timeout:?}; logs in {}",
                    self.address,
                    self.directory.path().join("log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The smb.conf path (for `smbclient -s`, `net -s`).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The directory both `C$` and `ADMIN$` serve.
    pub fn share_directory(&self) -> PathBuf {
        self.share.clone()
    }

    /// The log directory.
    pub fn log_directory(&self) -> PathBuf {
        self.directory.path().join("log")
    }

    /// The administrator's credentials.
    pub fn admin_credentials(&self) -> Credentials {
        Credentials { user: ADMIN_USER.into(), password: ADMIN_PASSWORD.into() }
    }

    /// A session as Administrator with the given options.
    pub async fn connect(&self, options: SmbOptions) -> Result<SmbSession> {
        SmbSession::connect(self.address, "127.0.0.1", &self.admin_credentials(), options).await
    }

    /// Imports a `.reg` file into the server's registry
    /// (`net registry import`); a trailing blank line is added so the last
    /// value is not dropped.
    pub fn import_registry(&self, reg_file_contents: &str) -> Result<()> {
        let path = self.directory.path().join("import.reg");
        let mut contents = reg_file_contents.to_owned();
        if !contents.ends_with("\n\n") {
            contents.push_str("\n\n");
        }
        std::fs::write(&path, contents).map_err(|error| harness(format!("writing the .reg file: {error}")))?;
        run(
            Command::new(NET).arg("-s").arg(&self.config).args(["registry", "import"]).arg(&path),
            "net registry import",
        )
    }

    fn read_pid(&self, file: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.directory.path().join("pid").join(file)).ok()?;
        text.trim().parse().ok()
    }
}

fn add_user_with_stdin(config: &Path) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new(SMBPASSWD)
        .arg("-c")
        .arg(config)
        .args(["-s", "-a", "root"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| harness(format!("smbpasswd: {error}; {INSTALL_HINT}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        writeln!(stdin, "{ADMIN_PASSWORD}\n{ADMIN_PASSWORD}")
            .map_err(|error| harness(format!("smbpasswd stdin: {error}")))?;
    }
    let output = child.wait_with_output().map_err(|error| harness(format!("smbpasswd: {error}")))?;
    if !output.status.success() {
        return Err(harness(format!("smbpasswd failed: {}", String::from_utf8_lossy(&output.stderr))));
    }
    Ok(())
}

impl Drop for SambaPeer {
    fn drop(&mut self) {
        for pid_file in ["smbd.pid", "samba-dcerpcd.pid"] {
            if let Some(pid) = self.read_pid(pid_file) {
                if pid > 1 {
                    let _ = Command::new("kill")
                        .arg("-TERM")
                        .arg(pid.to_string())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        // Give the daemons a moment to exit before their dir disappears.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let alive = ["smbd.pid", "samba-dcerpcd.pid"]
                .iter()
                .any(|file| self.read_pid(file).is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()));
            if !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
