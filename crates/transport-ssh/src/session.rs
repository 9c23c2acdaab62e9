//! One SSH connection to one target for the length of one step.
//!
//! [`Connection::open`] connects, checks the host key against the
//! `known_hosts` file (see [`HostKeyVerifier`]) and logs in; a step then runs
//! its remote scripts ([`Connection::run`]) and its SFTP transfers
//! ([`Connection::sftp`]) over that one session and closes it. Every russh,
//! SFTP and I/O failure is mapped here to the transport's [`Error`], with
//! transient (refused, reset, timed out) kept apart from permanent (login
//! rejected, host key not trusted). Nothing here logs or returns a secret.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetpatch_transport::{Credential, Error, Result, TargetSpec};
use russh::keys::{Algorithm, HashAlg, PrivateKeyWithHashAlg, PublicKey};
use russh::{ChannelMsg, Disconnect};
use tokio::net::TcpStream;

use crate::options::{HostKeyPolicy, SshOptions};

/// Most of a command's standard output kept (a target cannot make the worker
/// buffer more).
const MAX_STDOUT_BYTES: usize = 4 << 20;
/// Most of a command's standard error kept (the tail matters for messages).
const MAX_STDERR_BYTES: usize = 64 << 10;

/// The ciphers offered, AES-GCM first: the installers and the agent are
/// most of what a deployment sends, and OpenSSH's sshd decrypts AES-GCM
/// (AES-NI) for less CPU than its own chacha20-poly1305 (Debian's sshd 9.2
/// here, receiving 50 MB over one command: 220–310 ms of its CPU against
/// 330–340 ms). russh's default ciphers follow, for servers without AES-GCM.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// Serializes reads and trust-on-first-use writes of known_hosts files
/// within this process.
static KNOWN_HOSTS_LOCK: Mutex<()> = Mutex::new(());

/// What a host-key check decided, for messages.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    Ssh(russh::Error),
    HostKey(Box<HostKeyError>),
}

/// Why a server's host key is not trusted. Each message names the host
/// (`host` or `[host]:port`), the key it presented and what to do.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HostKeyError {
    #[error(
        "{name} presents {algorithm} key {fingerprint}, and no known_hosts_file is configured; set \
         transports.ssh.known_hosts_file"
    )]
    NoKnownHostsFile { name: String, algorithm: Algorithm, fingerprint: String },
    #[error("cannot read known_hosts file {}: {source}", file.display())]
    Unreadable {
        file: PathBuf,
        #[source]
        source: russh::keys::Error,
    },
    #[error(
        "the host key of {name} CHANGED: it now presents {algorithm} key {fingerprint}, but {} line {line} \
         records {recorded_algorithm} key {recorded_fingerprint}. This can be a man-in-the-middle attack. If the \
         host was reinstalled, check the new fingerprint on the host (ssh-keygen -lf \
         /etc/ssh/ssh_host_{}_key.pub), remove the old entry (ssh-keygen -R '{name}' -f {}) and add the new one",
        file.display(),
        key_file_kind(algorithm),
        file.display()
    )]
    Changed {
        name: String,
        algorithm: Algorithm,
        fingerprint: String,
        file: PathBuf,
        line: usize,
        recorded_algorithm: Algorithm,
        recorded_fingerprint: String,
    },
    #[error(
        "{name} is not in known_hosts file {}; it presents {algorithm} key {fingerprint}. After checking that \
         fingerprint on the host (ssh-keygen -lf /etc/ssh/ssh_host_{}_key.pub), trust it with `ssh-keyscan -p \
         {port} -t {} {host} >> {}`, or set host_key_policy = \"trust_on_first_use\"",
        file.display(),
        key_file_kind(algorithm),
        key_file_kind(algorithm),
        file.display()
    )]
    Unknown { name: String, host: String, port: u16, algorithm: Algorithm, fingerprint: String, file: PathBuf },
    #[error("cannot record the host key of {name} into {}: {source}", file.display())]
    Record {
        name: String,
        file: PathBuf,
        #[source]
        source: russh::keys::Error,
    },
}

impl From<russh::Error> for HandshakeError {
    fn from(error: russh::Error) -> Self {
        Self::Ssh(error)
    }
}

/// The SHA-256 fingerprint as OpenSSH prints it (`SHA256:...`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The `known_hosts` name of a host: `host` on port 22, `[host]:port` otherwise.
pub fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Checks the server's host key against the `known_hosts` file under the
/// configured policy.
pub(crate) struct HostKeyVerifier {
    host: String,
    port: u16,
    policy: HostKeyPolicy,
    known_hosts: Option<PathBuf>,
    /// The fingerprint the server presented, for preflight messages.
    presented: Arc<Mutex<Option<String>>>,
}

impl HostKeyVerifier {
    fn known_keys(&self, file: &Path) -> Result<Vec<(usize, PublicKey)>, Box<HostKeyError>> {
        russh::keys::known_hosts::known_host_keys_path(&self.host, self.port, file)
            .map_err(|source| Box::new(HostKeyError::Unreadable { file: file.to_owned(), source }))
    }

    /// Boxed: the error carries both keys' fingerprints and the file.
    fn check(&self, key: &PublicKey) -> Result<(), Box<HostKeyError>> {
        let name = known_hosts_name(&self.host, self.port);
        let algorithm = key.algorithm();
        let fingerprint = fingerprint(key);
        let Some(file) = &self.known_hosts else {
            return Err(Box::new(HostKeyError::NoKnownHostsFile { name, algorithm, fingerprint }));
        };
        let _guard = KNOWN_HOSTS_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let known = self.known_keys(file)?;
        if known.iter().any(|(_, recorded)| recorded.key_data() == key.key_data()) {
            return Ok(());
        }
        if let Some((line, recorded)) = known.first() {
            return Err(Box::new(HostKeyError::Changed {
                name,
                algorithm,
                fingerprint,
                file: file.clone(),
                line: *line,
                recorded_algorithm: recorded.algorithm(),
                recorded_fingerprint: fingerprint_of(recorded),
            }));
        }
        match self.policy {
            HostKeyPolicy::Strict => Err(Box::new(HostKeyError::Unknown {
                name,
                host: self.host.clone(),
                port: self.port,
                algorithm,
                fingerprint,
                file: file.clone(),
            })),
            HostKeyPolicy::TrustOnFirstUse => {
                if let Err(source) = russh::keys::known_hosts::learn_known_hosts_path(&self.host, self.port, key, file)
                {
                    return Err(Box::new(HostKeyError::Record { name, file: file.clone(), source }));
                }
                tracing::info!(
                    host = %name,
                    fingerprint = %fingerprint,
                    known_hosts = %file.display(),
                    "recorded new host key (trust on first use)"
                );
                Ok(())
            }
        }
    }

    /// The host-key algorithms to offer: those recorded for this host when
    /// there are any (so the server presents the key we know), else all.
    fn preferred_algorithms(&self) -> Option<Vec<Algorithm>> {
        let file = self.known_hosts.as_ref()?;
        let _guard = KNOWN_HOSTS_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let known = self.known_keys(file).ok()?;
        if known.is_empty() {
            return None;
        }
        let same_family = |a: &Algorithm, b: &Algorithm| match (a, b) {
            (Algorithm::Rsa { .. }, Algorithm::Rsa { .. }) => true,
            _ => a == b,
        };
        let preferred: Vec<Algorithm> = russh::Preferred::DEFAULT
            .key
            .iter()
            .filter(|offered| known.iter().any(|(_, key)| same_family(offered, &key.algorithm())))
            .cloned()
            .collect();
        (!preferred.is_empty()).then_some(preferred)
    }
}

fn fingerprint_of(key: &PublicKey) -> String {
    fingerprint(key)
}

/// `ed25519`, `ecdsa`, `rsa`: the word in `/etc/ssh/ssh_host_<kind>_key`
/// and in `ssh-keyscan -t`.
fn key_file_kind(algorithm: &Algorithm) -> &'static str {
    match algorithm {
        Algorithm::Ed25519 => "ed25519",
        Algorithm::Ecdsa { .. } => "ecdsa",
        Algorithm::Rsa { .. } => "rsa",
        _ => "ed25519",
    }
}

impl russh::client::Handler for HostKeyVerifier {
    type Error = HandshakeError;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        *self.presented.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(format!("{} {}", key.algorithm(), fingerprint(key)));
        self.check(key).map(|()| true).map_err(HandshakeError::HostKey)
    }
}

/// What a remote script printed and how it exited.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommandOutput {
    pub exit_status: Option<u32>,
    pub exit_signal: Option<String>,
    pub stdout: String,
    pub stderr: String,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.exit_status == Some(0)
    }

    /// A one-line summary of how it failed, for error messages.
    pub fn failure(&self) -> String {
        let how = match (&self.exit_status, &self.exit_signal) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "no exit status".into(),
        };
        let stderr = self.stderr.trim();
        if stderr.is_empty() {
            how
        } else {
            format!("{how}: {}", tail(stderr, 600))
        }
    }
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Where a step stands in the connection, for preflight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConnectStage {
    Port,
    HostKey,
    Login,
}

/// A connection failure and where it happened.
#[derive(Debug)]
pub(crate) struct ConnectFailure {
    pub stage: ConnectStage,
    pub error: Error,
    /// The host key the server presented, when it got that far.
    pub presented_key: Option<String>,
}

/// An authenticated SSH session to one target.
pub(crate) struct Connection {
    handle: russh::client::Handle<HostKeyVerifier>,
    pub address: String,
    pub username: String,
    pub is_root: bool,
    use_sudo: bool,
    command_timeout: Duration,
    pub presented_key: Option<String>,
}

/// The login user and port for a target.
pub(crate) fn login_of(options: &SshOptions, target: &TargetSpec) -> Result<(String, u16)> {
    let port = target.port.unwrap_or(options.port);
    let username = match &target.credential {
        Some(Credential::Password { username, .. } | Credential::PrivateKey { username, .. }) => {
            if username.is_empty() {
                options.default_user.clone()
            } else {
                username.clone()
            }
        }
        None => {
            return Err(Error::MissingCredential {
                address: address_of(&target.host, port),
                reason: "the ssh transport needs a private key or a password for the target".into(),
            })
        }
    };
    Ok((username, port))
}

pub(crate) fn address_of(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn ssh_error(address: &str, step: &'static str, error: russh::Error, timeout: Duration) -> Error {
    match error {
        russh::Error::IO(io) => io_error(address, io),
        russh::Error::ConnectionTimeout
        | russh::Error::KeepaliveTimeout
        | russh::Error::InactivityTimeout
        | russh::Error::Elapsed(_) => Error::Timeout { address: address.to_owned(), step, seconds: timeout.as_secs() },
        russh::Error::Disconnect | russh::Error::HUP | russh::Error::SendError => Error::Remote {
            address: address.to_owned(),
            reason: format!("the SSH connection was closed during {step}"),
            transient: true,
        },
        russh::Error::NoCommonAlgo { .. } | russh::Error::Version => Error::NotSupported {
            address: address.to_owned(),
            reason: format!("cannot negotiate SSH with the host: {error}"),
        },
        other => Error::Remote {
            address: address.to_owned(),
            reason: format!("SSH error during {step}: {other}"),
            transient: false,
        },
    }
}

fn io_error(address: &str, error: std::io::Error) -> Error {
    use std::io::ErrorKind::*;
    match error.kind() {
        TimedOut => Error::Timeout { address: address.to_owned(), step: "connect", seconds: 0 },
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe | UnexpectedEof
        | HostUnreachable | NetworkUnreachable | AddrNotAvailable | NetworkDown => {
            Error::Unreachable { address: address.to_owned(), reason: error.to_string() }
        }
        _ => Error::Unreachable { address: address.to_owned(), reason: error.to_string() },
    }
}

impl Connection {
    /// Connects, checks the host key and logs in, within the connect timeout.
    pub async fn open(options: &SshOptions, target: &TargetSpec) -> Result<Connection> {
        // Without a credential a deployment step fails at once, not after a connect.
        login_of(options, target)?;
        Self::open_staged(options, target).await.map_err(|failure| failure.error)
    }

    /// As [`Connection::open`], saying at which stage it failed.
    pub async fn open_staged(options: &SshOptions, target: &TargetSpec) -> Result<Connection, ConnectFailure> {
        let fail = |stage, error| ConnectFailure { stage, error, presented_key: None };
        // A missing credential is a login failure, told after the port and
        // the host key were really checked (a preflight reports those too).
        let login = login_of(options, target);
        let port = target.port.unwrap_or(options.port);
        let address = address_of(&target.host, port);
        let timeout = options.connect_timeout();
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = |stage| {
            fail(stage, Error::Timeout { address: address.clone(), step: "connect", seconds: timeout.as_secs() })
        };

        let socket = match tokio::time::timeout_at(deadline, TcpStream::connect((target.host.as_str(), port))).await {
            Err(_) => return Err(timed_out(ConnectStage::Port)),
            Ok(Err(error)) => return Err(fail(ConnectStage::Port, io_error(&address, error))),
            Ok(Ok(socket)) => socket,
        };
        let _ = socket.set_nodelay(true);

        let presented = Arc::new(Mutex::new(None));
        let verifier = HostKeyVerifier {
            host: target.host.clone(),
            port,
            policy: options.host_key_policy,
            known_hosts: options.known_hosts_file.clone(),
            presented: presented.clone(),
        };
        let mut preferred = russh::Preferred { cipher: Cow::Borrowed(CIPHERS), ..russh::Preferred::default() };
        if let Some(algorithms) = verifier.preferred_algorithms() {
            preferred.key = Cow::Owned(algorithms);
        }
        let config = Arc::new(russh::client::Config {
            preferred,
            nodelay: true,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..Default::default()
        });
        let presented_key = || presented.lock().unwrap_or_else(|p| p.into_inner()).clone();

        let handshake = russh::client::connect_stream(config, socket, verifier);
        let mut handle = match tokio::time::timeout_at(deadline, handshake).await {
            Err(_) => return Err(timed_out(ConnectStage::HostKey)),
            Ok(Err(HandshakeError::HostKey(error))) => {
                return Err(ConnectFailure {
                    stage: ConnectStage::HostKey,
                    error: Error::HostKey { address, reason: error.to_string() },
                    presented_key: presented_key(),
                })
            }
            Ok(Err(HandshakeError::Ssh(error))) => {
                return Err(fail(ConnectStage::HostKey, ssh_error(&address, "handshake", error, timeout)))
            }
            Ok(Ok(handle)) => handle,
        };

        let username = match login {
            Ok((username, _)) => username,
            Err(error) => {
                return Err(ConnectFailure { stage: ConnectStage::Login, error, presented_key: presented_key() })
            }
        };
        let login = Self::authenticate(&mut handle, &username, target, &address);
        match tokio::time::timeout_at(deadline, login).await {
            Err(_) => return Err(ConnectFailure { presented_key: presented_key(), ..timed_out(ConnectStage::Login) }),
            Ok(Err(error)) => {
                return Err(ConnectFailure { stage: ConnectStage::Login, error, presented_key: presented_key() })
            }
            Ok(Ok(())) => {}
        }

        let mut connection = Connection {
            handle,
            address,
            is_root: username == "root",
            username,
            use_sudo: options.use_sudo,
            command_timeout: options.command_timeout(),
            presented_key: presented_key(),
        };
        if !connection.is_root {
            // The login name says little (an account may have uid 0 under another name).
            let uid = connection.run_plain("id -u\n", "login").await.map_err(|error| ConnectFailure {
                stage: ConnectStage::Login,
                error,
                presented_key: connection.presented_key.clone(),
            })?;
            connection.is_root = uid.stdout.trim() == "0";
        }
        Ok(connection)
    }

    async fn authenticate(
        handle: &mut russh::client::Handle<HostKeyVerifier>,
        username: &str,
        target: &TargetSpec,
        address: &str,
    ) -> Result<()> {
        let rejected = |reason: String| Error::Authentication {
            address: address.to_owned(),
            username: username.to_owned(),
            reason,
        };
        let timeout = Duration::from_secs(0);
        let result = match &target.credential {
            Some(Credential::PrivateKey { key_pem, passphrase, .. }) => {
                let key = russh::keys::decode_secret_key(key_pem.expose(), passphrase.as_ref().map(|p| p.expose()))
                    .map_err(|e| {
                        rejected(match e {
                            russh::keys::Error::KeyIsEncrypted => {
                                "the private key is encrypted and no passphrase was given".into()
                            }
                            other if key_pem.expose().contains("RSA") || other.to_string().contains("rsa") => format!(
                                "the private key cannot be used ({other}): RSA keys are not supported by this \
                                 build of the ssh transport; use an ed25519 or ECDSA key"
                            ),
                            other => format!(
                                "the private key cannot be read ({other}); give an OpenSSH or PEM private key \
                                 (ed25519 or ECDSA) and its passphrase if it has one"
                            ),
                        })
                    })?;
                let hash = if matches!(key.algorithm(), Algorithm::Rsa { .. }) {
                    handle
                        .best_supported_rsa_hash()
                        .await
                        .map_err(|e| ssh_error(address, "login", e, timeout))?
                        .flatten()
                } else {
                    None
                };
                handle
                    .authenticate_publickey(username, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                    .await
                    .map_err(|e| ssh_error(address, "login", e, timeout))?
            }
            Some(Credential::Password { password, .. }) => handle
                .authenticate_password(username, password.expose())
                .await
                .map_err(|e| ssh_error(address, "login", e, timeout))?,
            None => {
                return Err(Error::MissingCredential {
                    address: address.to_owned(),
                    reason: "the ssh transport needs a private key or a password for the target".into(),
                })
            }
        };
        match result {
            russh::client::AuthResult::Success => Ok(()),
            russh::client::AuthResult::Failure { remaining_methods, .. } => {
                let method = match &target.credential {
                    Some(Credential::Password { .. }) => "the password",
                    _ => "the private key",
                };
                let accepted: Vec<&'static str> = remaining_methods.iter().map(<&'static str>::from).collect();
                Err(rejected(format!(
                    "{method} was not accepted (the server accepts: {}); check the credential, that the key is in \
                     the user's authorized_keys, and the server's PermitRootLogin/PasswordAuthentication settings",
                    if accepted.is_empty() { "nothing more".to_owned() } else { accepted.join(", ") }
                )))
            }
        }
    }

    /// Runs a script as the login user.
    pub async fn run_plain(&self, script: &str, step: &'static str) -> Result<CommandOutput> {
        self.exec("/bin/sh -s", script, step).await
    }

    /// Runs a script as root: directly when logged in as root, through
    /// `sudo -n` when `use_sudo` is set, else as the login user (whose
    /// failure then says permission denied).
    pub async fn run_privileged(&self, script: &str, step: &'static str) -> Result<CommandOutput> {
        if self.is_root || !self.use_sudo {
            self.run_plain(script, step).await
        } else {
            let output = self.exec("sudo -n /bin/sh -s", script, step).await?;
            if !output.success() && output.stderr.contains("sudo:") {
                return Err(Error::PermissionDenied {
                    address: self.address.clone(),
                    reason: format!(
                        "{step} needs root and sudo -n refused for {:?} ({}); grant passwordless sudo \
                         (NOPASSWD) or log in as root",
                        self.username,
                        tail(output.stderr.trim(), 300)
                    ),
                });
            }
            Ok(output)
        }
    }

    /// Runs `command` with `script` on its standard input, within the
    /// command timeout, keeping bounded output.
    async fn exec(&self, command: &str, script: &str, step: &'static str) -> Result<CommandOutput> {
        let timeout = self.command_timeout;
        let work = async {
            let mut channel =
                self.handle.channel_open_session().await.map_err(|e| ssh_error(&self.address, step, e, timeout))?;
            channel.exec(true, command).await.map_err(|e| ssh_error(&self.address, step, e, timeout))?;
            channel.data(script.as_bytes()).await.map_err(|e| ssh_error(&self.address, step, e, timeout))?;
            channel.eof().await.map_err(|e| ssh_error(&self.address, step, e, timeout))?;
            let mut output = CommandOutput::default();
            let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
            while let Some(message) = channel.wait().await {
                match message {
                    ChannelMsg::Data { data } => append_bounded(&mut stdout, &data, MAX_STDOUT_BYTES),
                    ChannelMsg::ExtendedData { data, .. } => append_tail(&mut stderr, &data, MAX_STDERR_BYTES),
                    ChannelMsg::ExitStatus { exit_status } => output.exit_status = Some(exit_status),
                    ChannelMsg::ExitSignal { signal_name, .. } => output.exit_signal = Some(format!("{signal_name:?}")),
                    ChannelMsg::Failure => {
                        return Err(Error::Remote {
                            address: self.address.clone(),
                            reason: format!("the server refused to run a command ({step})"),
                            transient: false,
                        })
                    }
                    _ => {}
                }
            }
            output.stdout = String::from_utf8_lossy(&stdout).into_owned();
            output.stderr = String::from_utf8_lossy(&stderr).into_owned();
            Ok(output)
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout { address: self.address.clone(), step, seconds: timeout.as_secs() }),
        }
    }

    /// Opens the SFTP subsystem on this session.
    pub async fn sftp(&self) -> Result<russh_sftp::client::SftpSession> {
        let timeout = self.command_timeout;
        let channel =
            self.handle.channel_open_session().await.map_err(|e| ssh_error(&self.address, "stage", e, timeout))?;
        channel.request_subsystem(true, "sftp").await.map_err(|e| ssh_error(&self.address, "stage", e, timeout))?;
        // Writes of up to 255 KiB (russh-sftp's default is 32 KiB): an eighth of
        // the requests and answers for both ends. OpenSSH's sftp-server takes
        // messages of 256 KiB, and since 8.6 says its limits
        // (`limits@openssh.com`), which russh-sftp keeps to. Two of them in
        // flight: as many bytes as the default's 16 × 32 KiB, so the same
        // memory per upload (16 would add ~70 MiB at 100 uploads at once)
        // and the same reach over a long round trip.
        let config = russh_sftp::client::Config {
            max_write_packet_len: 256 << 10,
            max_concurrent_writes: 2,
            ..Default::default()
        };
        let sftp = tokio::time::timeout(
            timeout,
            russh_sftp::client::SftpSession::new_with_config(channel.into_stream(), config),
        )
        .await
        .map_err(|_| Error::Timeout { address: self.address.clone(), step: "stage", seconds: timeout.as_secs() })?
        .map_err(|e| Error::NotSupported {
            address: self.address.clone(),
            reason: format!(
                "the SFTP subsystem is not available ({e}); enable `Subsystem sftp` in the target's sshd_config"
            ),
        })?;
        sftp.set_timeout(timeout.as_secs().max(1));
        Ok(sftp)
    }

    /// Whether the server still answers on this connection: one keepalive
    /// round trip (`keepalive@openssh.com` with a reply) within `within`.
    /// For a connection taken from the pool, whose peer may have gone
    /// (rebooted, a firewall dropped the idle flow) without a word.
    pub async fn answers(&self, within: Duration) -> bool {
        // `send_ping` also returns Ok when the session ended meanwhile.
        matches!(tokio::time::timeout(within, self.handle.send_ping()).await, Ok(Ok(()))) && !self.handle.is_closed()
    }

    /// Whether the server or the network ended the connection.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Ends the session politely.
    pub async fn close(self) {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.handle.disconnect(Disconnect::ByApplication, "", "en"))
                .await;
    }
}

fn append_bounded(buffer: &mut Vec<u8>, data: &[u8], max: usize) {
    let room = max.saturating_sub(buffer.len());
    buffer.extend_from_slice(&data[..data.len().min(room)]);
}

fn append_tail(buffer: &mut Vec<u8>, data: &[u8], max: usize) {
    buffer.extend_from_slice(data);
    if buffer.len() > max {
        let excess = buffer.len() - max;
        buffer.drain(..excess);
    }
}

/// Maps an SFTP failure during staging.
pub(crate) fn sftp_error(address: &str, what: &str, error: russh_sftp::client::error::Error) -> Error {
    use russh_sftp::client::error::Error as Sftp;
    use russh_sftp::protocol::StatusCode;
    match error {
        Sftp::Status(status) if status.status_code == StatusCode::PermissionDenied => {
            Error::PermissionDenied { address: address.to_owned(), reason: format!("{what}: {}", status.error_message) }
        }
        Sftp::Status(status) => Error::Remote {
            address: address.to_owned(),
            reason: format!("{what}: {} ({})", status.error_message, status.status_code),
            transient: false,
        },
        Sftp::Timeout => Error::Timeout { address: address.to_owned(), step: "stage", seconds: 0 },
        other => Error::Remote { address: address.to_owned(), reason: format!("{what}: {other}"), transient: true },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_names_follow_openssh() {
        assert_eq!(known_hosts_name("web1", 22), "web1");
        assert_eq!(known_hosts_name("127.0.0.1", 2222), "[127.0.0.1]:2222");
        assert_eq!(address_of("::1", 22), "[::1]:22");
    }

    #[test]
    fn output_stays_bounded() {
        let mut out = Vec::new();
        append_bounded(&mut out, &[1; 10], 4);
        append_bounded(&mut out, &[2; 10], 4);
        assert_eq!(out, vec![1; 4]);
        let mut err = Vec::new();
        append_tail(&mut err, b"abcdef", 4);
        append_tail(&mut err, b"gh", 4);
        assert_eq!(err, b"efgh");
        assert_eq!(tail("héllo", 4), "llo");
    }

    #[test]
    fn host_key_refusals_name_the_host_the_key_and_the_file() {
        const RECORDED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEOBAHnEbkCToigh/4/bzceXNKqlnHRiTUVm/goeesHY";
        const PRESENTED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAID3ExdG4FNN3/8+ZaYi8Z8pWaAQMpX5Bw/keKZkCFQ+c";
        let presented = PublicKey::from_openssh(PRESENTED).unwrap();
        let dir =
            std::env::temp_dir().join(format!("fp-hostkey-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let verifier = |known_hosts: Option<PathBuf>| HostKeyVerifier {
            host: "web1".into(),
            port: 2222,
            policy: HostKeyPolicy::Strict,
            known_hosts,
            presented: Arc::default(),
        };
        let error = verifier(None).check(&presented).unwrap_err();
        assert!(matches!(*error, HostKeyError::NoKnownHostsFile { .. }), "{error:?}");
        assert!(error.to_string().starts_with("[web1]:2222 presents ssh-ed25519 key SHA256:"), "{error}");

        let unknown = dir.join("empty_known_hosts");
        std::fs::write(&unknown, "").unwrap();
        let error = verifier(Some(unknown.clone())).check(&presented).unwrap_err().to_string();
        assert!(error.starts_with(&format!("[web1]:2222 is not in known_hosts file {}", unknown.display())), "{error}");
        assert!(error.contains("ssh-keyscan -p 2222 -t ed25519 web1 >> "), "{error}");

        let changed = dir.join("known_hosts");
        std::fs::write(&changed, format!("[web1]:2222 {RECORDED}\n")).unwrap();
        let error = verifier(Some(changed.clone())).check(&presented).unwrap_err();
        assert!(matches!(*error, HostKeyError::Changed { line: 1, .. }), "{error:?}");
        let error = error.to_string();
        assert!(error.starts_with("the host key of [web1]:2222 CHANGED"), "{error}");
        assert!(error.contains(&format!("{} line 1 records ssh-ed25519 key SHA256:", changed.display())), "{error}");
        let recorded = PublicKey::from_openssh(RECORDED).unwrap();
        assert!(verifier(Some(changed)).check(&recorded).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refused_connections_are_transient() {
        let error = io_error("h:22", std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(error, Error::Unreachable { .. }));
        assert!(error.is_transient());
    }
}
