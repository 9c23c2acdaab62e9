//! SMB2/3 sessions to a target: NTLM logon, signing, encryption when the
//! server offers it, file staging on disk shares and named pipes on `IPC$`.
//!
//! Owns: the connection policy (signing always required, encryption policy,
//! timeouts), the mapping of share-relative paths, pipelined bulk transfer,
//! and the [`SmbPipe`] that [`crate::dcerpc`] runs over.
//!
//! Built on smb-rs (vendored with a small patch, see `vendor/VENDORED.md`)
//! and our own [`transport::NoDelayTcpTransport`]. Credentials are only
//! handed to the NTLM code; they are never logged or formatted.

pub mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use futures_util::StreamExt;
use smb_rs::{
    Connection, ConnectionConfig, CreateDisposition, CreateOptions, FileAccessMask, FileAttributes, FileCreateArgs,
    FileDirectoryInformation, FileDispositionInformation, Guid, Resource, Session, Tree, UncPath,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::dcerpc::{Interface, PipeIo, RpcClient, DEFAULT_MAX_FRAGMENT};
use crate::error::{smb_status_of, Error, NtStatus, Result};
use crate::rrp::{RemoteRegistry, WINREG};
use crate::scmr::{ServiceControlManager, SVCCTL};

/// Who logs on.
#[derive(Clone)]
pub struct Credentials {
    /// Account name (`Administrator`), optionally `DOMAIN\user` or
    /// `user@domain`.
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

/// Whether SMB3 encryption is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncryptionPolicy {
    /// Encrypt whenever the negotiated dialect and cipher allow it (SMB 3.x);
    /// fall back to signing only with SMB 2.x servers.
    #[default]
    WhenOffered,
    /// Refuse servers that cannot encrypt.
    Required,
    /// Sign only (what `smbclient` does unless told `-e`).
    Disabled,
}

/// Connection options.
#[derive(Debug, Clone)]
pub struct SmbOptions {
    /// Timeout for the TCP connect and for each SMB request.
    pub timeout: Duration,
    pub encryption: EncryptionPolicy,
    /// Bytes per READ/WRITE request in bulk transfers (capped by what the
    /// server negotiated).
    pub io_chunk_bytes: u32,
    /// READ/WRITE requests kept in flight during bulk transfers. Only used
    /// with chunks of at most 64 KiB: smb-rs 0.12 loses track of credits
    /// when several multi-credit (> 64 KiB) requests are in flight and then
    /// waits forever for credits (seen after ~27 MiB of 1 MiB writes x4
    /// against Samba), so larger chunks go one at a time.
    pub io_requests_in_flight: usize,
    /// Which TCP transport carries SMB; keep the default except to measure.
    pub transport: TransportKind,
}

/// The TCP transport under the SMB connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    /// [`transport::NoDelayTcpTransport`]: `TCP_NODELAY`, one write per
    /// message.
    #[default]
    NoDelay,
    /// smb-rs 0.12's own TCP transport (Nagle on, several writes per
    /// message), kept only to measure the difference.
    SmbRsDefault,
}

impl Default for SmbOptions {
    fn default() -> Self {
        SmbOptions {
            timeout: Duration::from_secs(30),
            encryption: EncryptionPolicy::WhenOffered,
            io_chunk_bytes: SINGLE_CREDIT_BYTES,
            io_requests_in_flight: 16,
            transport: TransportKind::NoDelay,
        }
    }
}

/// What the server and we agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NegotiatedSecurity {
    /// Dialect, e.g. `Smb0311`.
    pub dialect: String,
    /// Every message is signed (always true: unsigned sessions are refused).
    pub signing: bool,
    /// Messages are encrypted (SMB3 transform).
    pub encryption: bool,
}

/// A directory entry from [`SmbSession::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub is_directory: bool,
    pub size: u64,
}

/// The largest READ/WRITE that costs one credit.
const SINGLE_CREDIT_BYTES: u32 = 64 * 1024;

/// Access mask bits (MS-SMB2 2.2.13.1).
mod access_bits {
    pub const FILE_READ_DATA: u32 = 0x0000_0001;
    pub const FILE_WRITE_DATA: u32 = 0x0000_0002;
    pub const FILE_READ_ATTRIBUTES: u32 = 0x0000_0080;
    pub const FILE_WRITE_ATTRIBUTES: u32 = 0x0000_0100;
    pub const DELETE: u32 = 0x0001_0000;
    pub const SYNCHRONIZE: u32 = 0x0010_0000;
}

fn access_mask(bits: u32) -> FileAccessMask {
    FileAccessMask::from_bytes(bits.to_le_bytes())
}

/// Normalises a share-relative path: `/` and `\` both separate, no leading
/// separator, no `..` components, no NUL.
pub fn normalize_share_path(path: &str) -> Result<String> {
    if path.contains('\0') {
        return Err(Error::InvalidArgument(format!("path {path:?} contains NUL")));
    }
    let mut parts = Vec::new();
    for part in path.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return Err(Error::InvalidArgument(format!("path {path:?} must not contain '..'"))),
            other => parts.push(other),
        }
    }
    Ok(parts.join("\\"))
}

/// An authenticated SMB session to one target.
pub struct SmbSession {
    connection: Connection,
    session: Session,
    trees: Mutex<HashMap<String, Arc<Tree>>>,
    server_name: String,
    address: SocketAddr,
    options: SmbOptions,
    security: NegotiatedSecurity,
}

impl std::fmt::Debug for SmbSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmbSession")
            .field("server_name", &self.server_name)
            .field("address", &self.address)
            .field("security", &self.security)
            .finish_non_exhaustive()
    }
}

fn auth_identity(credentials: &Credentials) -> Result<sspi::AuthIdentity> {
    let username = sspi::Username::parse(&credentials.user)
        .map_err(|error| Error::InvalidArgument(format!("user name {:?}: {error}", credentials.user)))?;
    Ok(sspi::AuthIdentity { username, password: credentials.password.clone().into() })
}

fn is_logon_status(status: NtStatus) -> bool {
    matches!(
        status,
        NtStatus::STATUS_LOGON_FAILURE
            | NtStatus::STATUS_ACCOUNT_RESTRICTION
            | NtStatus::STATUS_PASSWORD_EXPIRED
            | NtStatus::STATUS_ACCOUNT_DISABLED
            | NtStatus::STATUS_ACCOUNT_LOCKED_OUT
    )
}

impl SmbSession {
    /// Connects to `address`, negotiates SMB 2.0.2–3.1.1, logs on with NTLM.
    ///
    /// `server_name` is the target's name as the server knows it (used in
    /// UNC paths and the NTLM exchange); an IP address works for Samba and
    /// Windows.
    pub async fn connect(
        address: SocketAddr,
        server_name: &str,
        credentials: &Credentials,
        options: SmbOptions,
    ) -> Result<SmbSession> {
        let (connection, encryption) = match options.encryption {
            EncryptionPolicy::Disabled => (
                Self::negotiate(address, server_name, &options, smb_rs::connection::EncryptionMode::Disabled).await?,
                false,
            ),
            EncryptionPolicy::Required => (
                Self::negotiate(address, server_name, &options, smb_rs::connection::EncryptionMode::Required).await?,
                true,
            ),
            EncryptionPolicy::WhenOffered => {
                let probe =
                    Self::negotiate(address, server_name, &options, smb_rs::connection::EncryptionMode::Allowed)
                        .await?;
                if Self::can_encrypt(&probe) {
                    // The connection config is fixed at negotiation; start
                    // over with encryption required (one extra negotiate).
                    let _ = probe.close().await;
                    (
                        Self::negotiate(address, server_name, &options, smb_rs::connection::EncryptionMode::Required)
                            .await?,
                        true,
                    )
                } else {
                    (probe, false)
                }
            }
        };
        let dialect =
            connection.conn_info().map(|info| format!("{:?}", info.negotiation.dialect_rev)).unwrap_or_default();
        let session = match connection.authenticate(auth_identity(credentials)?).await {
            Ok(session) => session,
            Err(error) => {
                let _ = connection.close().await;
                return Err(match smb_status_of(&error) {
                    Some(status) if is_logon_status(status) => {
                        Error::LogonFailed { server: server_name.to_owned(), user: credentials.user.clone(), status }
                    }
                    _ => Error::from_smb(format!("logon to {server_name}"), error),
                });
            }
        };
        tracing::debug!(server = %server_name, %dialect, encryption, "smb session established");
        Ok(SmbSession {
            connection,
            session,
            trees: Mutex::new(HashMap::new()),
            server_name: server_name.to_owned(),
            address,
            options,
            security: NegotiatedSecurity { dialect, signing: true, encryption },
        })
    }

    async fn negotiate(
        address: SocketAddr,
        server_name: &str,
        options: &SmbOptions,
        encryption_mode: smb_rs::connection::EncryptionMode,
    ) -> Result<Connection> {
        let transport: Box<dyn smb_rs::transport::SmbTransport> = match options.transport {
            TransportKind::NoDelay => {
                Box::new(transport::NoDelayTcpTransport::connect(address, options.timeout).await?)
            }
            TransportKind::SmbRsDefault => {
                let mut transport = smb_rs::transport::TcpTransport::new(options.timeout);
                smb_rs::transport::SmbTransport::connect(&mut transport, server_name, address)
                    .await
                    .map_err(|error| Error::Connect { address, source: std::io::Error::other(error.to_string()) })?;
                Box::new(transport)
            }
        };
        let config = ConnectionConfig {
            timeout: Some(options.timeout),
            encryption_mode,
            // Signing is mandatory: guest and anonymous sessions, whose
            // messages cannot be signed, are refused.
            allow_unsigned_guest_access: false,
            smb2_only_negotiate: true,
            ..Default::default()
        };
        Connection::from_transport(transport, server_name, Guid::generate(), config)
            .await
            .map_err(|error| Error::from_smb(format!("SMB negotiation with {address}"), error))
    }

    fn can_encrypt(connection: &Connection) -> bool {
        let Some(info) = connection.conn_info() else {
            return false;
        };
        let dialect = info.negotiation.dialect_rev;
        if !dialect.is_smb3() {
            return false;
        }
        if dialect == smb_rs::Dialect::Smb0311 {
            return info
                .negotiation
                .encryption_cipher
                .is_some_and(|cipher| smb_rs::crypto::ENCRYPTING_ALGOS.contains(&cipher));
        }
        smb_rs::crypto::ENCRYPTING_ALGOS.contains(&smb_rs::EncryptionCipher::Aes128Ccm)
    }

    /// Dialect, signing and encryption in use.
    pub fn security(&self) -> &NegotiatedSecurity {
        &self.security
    }

    /// The server name this session was opened with.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    fn transfer_chunk(&self, read: bool) -> usize {
        let negotiated = self
            .connection
            .conn_info()
            .map(|info| if read { info.negotiation.max_read_size } else { info.negotiation.max_write_size })
            .unwrap_or(64 * 1024);
        negotiated.min(self.options.io_chunk_bytes).max(4096) as usize
    }

    /// Requests in flight for chunks of `chunk_size` (see
    /// [`SmbOptions::io_requests_in_flight`]).
    fn requests_in_flight(&self, chunk_size: usize) -> usize {
        if chunk_size > SINGLE_CREDIT_BYTES as usize {
            1
        } else {
            self.options.io_requests_in_flight.max(1)
        }
    }

    async fn tree(&self, share: &str) -> Result<Arc<Tree>> {
        let key = share.to_ascii_uppercase();
        let mut trees = self.trees.lock().await;
        if let Some(tree) = trees.get(&key) {
            return Ok(tree.clone());
        }
        let path = UncPath::new(&self.server_name)
            .and_then(|path| path.with_share(share))
            .map_err(|error| Error::InvalidArgument(format!("share {share:?}: {error}")))?;
        let tree = self
            .session
            .tree_connect(&path)
            .await
            .map_err(|error| Error::from_smb(format!("connecting share {share}"), error))?;
        let tree = Arc::new(tree);
        trees.insert(key, tree.clone());
        Ok(tree)
    }

    async fn create(&self, share: &str, path: &str, args: &FileCreateArgs, operation: &str) -> Result<Resource> {
        let tree = self.tree(share).await?;
        tree.create(path, args).await.map_err(|error| Error::from_smb(format!("{operation} {share}\\{path}"), error))
    }

    /// Writes everything `reader` yields to `share\path` (created or
    /// truncated), keeping several WRITE requests in flight. Returns the
    /// byte count.
    pub async fn put_file<R>(&self, share: &str, path: &str, mut reader: R) -> Result<u64>
    where
        R: AsyncRead + Unpin,
    {
        let path = normalize_share_path(path)?;
        let resource = self
            .create(
                share,
                &path,
                &FileCreateArgs {
                    disposition: CreateDisposition::OverwriteIf,
                    attributes: FileAttributes::new(),
                    options: CreateOptions::new().with_non_directory_file(true),
                    desired_access: access_mask(
                        access_bits::FILE_WRITE_DATA
                            | access_bits::FILE_READ_ATTRIBUTES
                            | access_bits::FILE_WRITE_ATTRIBUTES
                            | access_bits::SYNCHRONIZE,
                    ),
                },
                "creating",
            )
            .await?;
        let Resource::File(file) = resource else {
            return Err(Error::InvalidArgument(format!("{share}\\{path} is a directory or a pipe, not a file")));
        };
        let chunk_size = self.transfer_chunk(false);
        let result = async {
            let mut offset = 0u64;
            let mut in_flight = FuturesUnordered::new();
            loop {
                let mut chunk = vec![0u8; chunk_size];
                let filled = read_full(&mut reader, &mut chunk).await.map_err(|source| Error::LocalIo {
                    context: format!("reading the data for {share}\\{path}"),
                    source,
                })?;
                if filled == 0 {
                    break;
                }
                chunk.truncate(filled);
                let expected = chunk.len();
                let data: Arc<[u8]> = chunk.into();
                let position = offset;
                let file = &file;
                in_flight.push(async move {
                    let written = file.write_block_zc(data, position, None).await?;
                    if written != expected {
                        return Err(std::io::Error::other(format!(
                            "server wrote {written} of {expected} bytes at offset {position}"
                        )));
                    }
                    Ok::<_, std::io::Error>(())
                });
                offset += filled as u64;
                if in_flight.len() >= self.requests_in_flight(chunk_size) {
                    write_outcome(in_flight.next().await, share, &path)?;
                }
                if filled < chunk_size {
                    break;
                }
            }
            while let Some(outcome) = in_flight.next().await {
                write_outcome(Some(outcome), share, &path)?;
            }
            Ok(offset)
        }
        .await;
        let closed = file.close().await;
        let written = result?;
        closed.map_err(|error| Error::from_smb(format!("closing {share}\\{path}"), error))?;
        Ok(written)
    }

    /// Streams `share\path` into `writer`, keeping several READ requests in
    /// flight. Returns the byte count.
    pub async fn read_file<W>(&self, share: &str, path: &str, mut writer: W) -> Result<u64>
    where
        W: AsyncWrite + Unpin,
    {
        let path = normalize_share_path(path)?;
        let resource = self
            .create(
                share,
                &path,
                &FileCreateArgs {
                    disposition: CreateDisposition::Open,
                    attributes: FileAttributes::new(),
                    options: CreateOptions::new().with_non_directory_file(true),
                    desired_access: access_mask(
                        access_bits::FILE_READ_DATA | access_bits::FILE_READ_ATTRIBUTES | access_bits::SYNCHRONIZE,
                    ),
                },
                "opening",
            )
            .await?;
        let Resource::File(file) = resource else {
            return Err(Error::InvalidArgument(format!("{share}\\{path} is a directory or a pipe, not a file")));
        };
        let size = {
            use smb_rs::GetLen;
            file.get_len().await.map_err(|error| Error::from_smb(format!("size of {share}\\{path}"), error))?
        };
        let chunk_size = self.transfer_chunk(true) as u64;
        let result = async {
            let mut next_offset = 0u64;
            let mut total = 0u64;
            let mut in_flight = FuturesOrdered::new();
            loop {
                while next_offset < size && in_flight.len() < self.requests_in_flight(chunk_size as usize) {
                    let position = next_offset;
                    let length = chunk_size.min(size - position) as usize;
                    next_offset += length as u64;
                    let file = &file;
                    in_flight.push_back(async move {
                        let mut buffer = vec![0u8; length];
                        let mut filled = 0;
                        while filled < length {
                            let count =
                                file.read_block(&mut buffer[filled..], position + filled as u64, None, false).await?;
                            if count == 0 {
                                break;
                            }
                            filled += count;
                        }
                        buffer.truncate(filled);
                        Ok::<_, std::io::Error>(buffer)
                    });
                }
                let Some(outcome) = in_flight.next().await else {
                    break;
                };
                let buffer = outcome.map_err(|error| Error::Smb {
                    operation: format!("reading {share}\\{path}"),
                    source: Box::new(smb_rs::Error::IoError(error)),
                })?;
                writer.write_all(&buffer).await.map_err(|source| Error::LocalIo {
                    context: format!("writing what was read from {share}\\{path}"),
                    source,
                })?;
                total += buffer.len() as u64;
            }
            writer.flush().await.map_err(|source| Error::LocalIo {
                context: format!("writing what was read from {share}\\{path}"),
                source,
            })?;
            Ok(total)
        }
        .await;
        let closed = file.close().await;
        let total = result?;
        closed.map_err(|error| Error::from_smb(format!("closing {share}\\{path}"), error))?;
        Ok(total)
    }

    /// Deletes a file or an empty directory.
    pub async fn delete(&self, share: &str, path: &str) -> Result<()> {
        let path = normalize_share_path(path)?;
        let resource = self
            .create(
                share,
                &path,
                &FileCreateArgs {
                    disposition: CreateDisposition::Open,
                    attributes: FileAttributes::new(),
                    options: CreateOptions::new(),
                    desired_access: access_mask(
                        access_bits::DELETE | access_bits::FILE_READ_ATTRIBUTES | access_bits::SYNCHRONIZE,
                    ),
                },
                "opening for deletion",
            )
            .await?;
        let handle = match &resource {
            Resource::File(file) => file.handle(),
            Resource::Directory(directory) => directory.handle(),
            Resource::Pipe(_) => return Err(Error::InvalidArgument(format!("{share}\\{path} is a pipe"))),
        };
        let marked = handle
            .set_info(FileDispositionInformation::default())
            .await
            .map_err(|error| Error::from_smb(format!("deleting {share}\\{path}"), error));
        let closed = handle.close().await;
        marked?;
        closed.map_err(|error| Error::from_smb(format!("closing {share}\\{path}"), error))
    }

    /// Creates `path` and every missing parent directory.
    pub async fn mkdir_all(&self, share: &str, path: &str) -> Result<()> {
        let path = normalize_share_path(path)?;
        let mut current = String::new();
        for part in path.split('\\').filter(|part| !part.is_empty()) {
            if !current.is_empty() {
                current.push('\\');
            }
            current.push_str(part);
            let resource = self
                .create(
                    share,
                    &current,
                    &FileCreateArgs {
                        disposition: CreateDisposition::OpenIf,
                        attributes: FileAttributes::new().with_directory(true),
                        options: CreateOptions::new().with_directory_file(true),
                        desired_access: access_mask(access_bits::FILE_READ_ATTRIBUTES | access_bits::SYNCHRONIZE),
                    },
                    "creating directory",
                )
                .await?;
            let Resource::Directory(directory) = resource else {
                return Err(Error::InvalidArgument(format!("{share}\\{current} exists and is not a directory")));
            };
            directory
                .handle()
                .close()
                .await
                .map_err(|error| Error::from_smb(format!("closing {share}\\{current}"), error))?;
        }
        Ok(())
    }

    /// Lists a directory (without `.` and `..`).
    ///
    /// Uses one QUERY_DIRECTORY round trip at a time on the caller's task
    /// (no background task: the stream of smb-rs 0.12 lost a wake-up on the
    /// multi-thread runtime and hung; see `vendor/VENDORED.md`).
    pub async fn list(&self, share: &str, path: &str) -> Result<Vec<DirEntry>> {
        let path = normalize_share_path(path)?;
        let resource = self
            .create(
                share,
                &path,
                &FileCreateArgs {
                    disposition: CreateDisposition::Open,
                    attributes: FileAttributes::new(),
                    options: CreateOptions::new().with_directory_file(true),
                    desired_access: access_mask(
                        access_bits::FILE_READ_DATA | access_bits::FILE_READ_ATTRIBUTES | access_bits::SYNCHRONIZE,
                    ),
                },
                "opening directory",
            )
            .await?;
        let Resource::Directory(directory) = resource else {
            return Err(Error::InvalidArgument(format!("{share}\\{path} is not a directory")));
        };
        let result = async {
            let mut entries = Vec::new();
            let mut restart = true;
            // A bound on round trips: 100 000 batches is far beyond any
            // staging directory and stops a server that never says "no more".
            for _ in 0..100_000 {
                let batch = directory
                    .query_batch::<FileDirectoryInformation>("*", restart, 64 * 1024)
                    .await
                    .map_err(|error| Error::from_smb(format!("listing {share}\\{path}"), error))?;
                restart = false;
                if batch.is_empty() {
                    return Ok(entries);
                }
                for item in batch {
                    let name = item.file_name.to_string();
                    if name == "." || name == ".." {
                        continue;
                    }
                    entries.push(DirEntry {
                        name,
                        is_directory: item.file_attributes.directory(),
                        size: item.end_of_file,
                    });
                }
            }
            Err(Error::malformed("directory listing", format!("{share}\\{path} did not end after 100000 batches")))
        }
        .await;
        let closed = directory.handle().close().await;
        let entries = result?;
        closed.map_err(|error| Error::from_smb(format!("closing {share}\\{path}"), error))?;
        Ok(entries)
    }

    /// Opens `\PIPE\name` on `IPC$`.
    pub async fn open_pipe(&self, name: &str) -> Result<SmbPipe> {
        let resource = self.create("IPC$", name, &FileCreateArgs::make_pipe(), "opening pipe").await?;
        match resource {
            Resource::Pipe(pipe) => Ok(SmbPipe { pipe, name: name.to_owned() }),
            _ => Err(Error::malformed("pipe open", format!("IPC$\\{name} is not a pipe"))),
        }
    }

    /// Opens the interface's pipe and binds it with NDR32.
    pub async fn bind(&self, interface: Interface) -> Result<RpcClient<SmbPipe>> {
        let pipe = self.open_pipe(interface.pipe).await?;
        RpcClient::bind(pipe, interface, DEFAULT_MAX_FRAGMENT).await
    }

    /// `winreg` with HKLM open.
    pub async fn remote_registry(&self) -> Result<RemoteRegistry<SmbPipe>> {
        RemoteRegistry::open(self.bind(WINREG).await?).await
    }

    /// `svcctl` with the SCM open with `desired_access`.
    pub async fn service_control_manager(&self, desired_access: u32) -> Result<ServiceControlManager<SmbPipe>> {
        ServiceControlManager::open(self.bind(SVCCTL).await?, Some(&self.server_name), desired_access).await
    }

    /// Disconnects the shares, logs off and closes the connection.
    pub async fn close(self) -> Result<()> {
        let trees: Vec<Arc<Tree>> = self.trees.lock().await.drain().map(|(_, t)| t).collect();
        for tree in trees {
            let _ = tree.disconnect().await;
        }
        let logoff = self.session.logoff().await;
        let closed = self.connection.close().await;
        logoff.map_err(|error| Error::from_smb("logoff", error))?;
        closed.map_err(|error| Error::from_smb("closing the connection", error))
    }
}

fn write_outcome(outcome: Option<std::io::Result<()>>, share: &str, path: &str) -> Result<()> {
    match outcome {
        Some(Ok(())) | None => Ok(()),
        Some(Err(error)) => Err(Error::Smb {
            operation: format!("writing {share}\\{path}"),
            source: Box::new(smb_rs::Error::IoError(error)),
        }),
    }
}

/// Fills `buffer` from `reader` unless it ends first; returns the count.
async fn read_full<R: AsyncRead + Unpin>(reader: &mut R, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        let count = reader.read(&mut buffer[filled..]).await?;
        if count == 0 {
            break;
        }
        filled += count;
    }
    Ok(filled)
}

/// A named pipe on `IPC$`, the transport of DCE/RPC (ncacn_np).
pub struct SmbPipe {
    pipe: smb_rs::Pipe,
    name: String,
}

impl std::fmt::Debug for SmbPipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmbPipe").field("name", &self.name).finish()
    }
}

impl SmbPipe {
    /// Closes the pipe handle.
    pub async fn close(self) -> Result<()> {
        self.pipe.handle().close().await.map_err(|error| Error::from_smb(format!("closing pipe {}", self.name), error))
    }
}

impl PipeIo for SmbPipe {
    async fn transceive(&mut self, request: &[u8], max_output: u32) -> Result<(Vec<u8>, bool)> {
        self.pipe
            .transceive(request, max_output)
            .await
            .map_err(|error| Error::from_smb(format!("transceive on pipe {}", self.name), error))
    }

    async fn write(&mut self, data: &[u8]) -> Result<()> {
        let written = self
            .pipe
            .write_message(data)
            .await
            .map_err(|error| Error::from_smb(format!("write to pipe {}", self.name), error))?;
        if written as usize != data.len() {
            return Err(Error::malformed("pipe write", format!("{written} of {} bytes written", data.len())));
        }
        Ok(())
    }

    async fn read(&mut self, max_len: u32) -> Result<(Vec<u8>, bool)> {
        self.pipe
            .read_message(max_len)
            .await
            .map_err(|error| Error::from_smb(format!("read from pipe {}", self.name), error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_paths_are_normalised() {
        assert_eq!(normalize_share_path("/Windows/Patches\\a.exe").unwrap(), "Windows\\Patches\\a.exe");
        assert_eq!(normalize_share_path("").unwrap(), "");
        assert!(normalize_share_path("a/../b").is_err());
        assert!(normalize_share_path("a\0b").is_err());
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let credentials = Credentials { user: "Administrator".into(), password: "s3cret".into() };
        assert!(!format!("{credentials:?}").contains("s3cret"));
    }
}
