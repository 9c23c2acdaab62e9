//! Windows-side protocols of fleetpatch's `smb` transport.
//!
//! A worker reaches a Windows target the way psexec and PDQ Deploy do,
//! without an agent installed beforehand:
//!
//! 1. [`smb::SmbSession`]: SMB2/3 with NTLM, signing always required,
//!    encryption whenever the server offers it; staging files on `C$` /
//!    `ADMIN$` ([`smb::SmbSession::put_file`], `read_file`, `mkdir_all`,
//!    `list`, `delete`) and named pipes on `IPC$`.
//! 2. [`dcerpc`]: DCE/RPC connection-oriented PDUs over those pipes
//!    (bind with NDR32, fragmented requests and replies, faults).
//! 3. [`ndr`]: the NDR32 encoder and bounded decoder.
//! 4. [`rrp`]: MS-RRP (`winreg`) and [`rrp::RemoteRegistry`] for the probe
//!    and the verification scan.
//! 5. [`scmr`]: MS-SCMR (`svcctl`) and [`scmr::ServiceControlManager`] for
//!    the agent service's create/start/query/stop/delete, and for listing
//!    the target's services.
//!
//! All errors are [`Error`]; Win32, NT and RPC fault codes keep their
//! symbolic names. Every decoder is total and bounded (property-tested).
//!
//! With the `test-support` feature, [`test_support::SambaPeer`] starts a
//! private Samba `smbd` on loopback for integration tests.

pub mod dcerpc;
pub mod error;
pub mod ndr;
pub mod rrp;
pub mod scmr;
pub mod smb;
#[cfg(feature = "test-support")]
pub mod test_support;

pub use error::{Error, NtStatus, Result, RpcFaultStatus, Win32Error};
pub use rrp::{RegistryValue, RemoteRegistry};
pub use scmr::{
    CreateOutcome, EnumServiceStatus, ServiceAccount, ServiceControlManager, ServiceSpec, ServiceState, ServiceStatus,
};
pub use smb::{Credentials, DirEntry, EncryptionPolicy, SmbOptions, SmbPipe, SmbSession, TransportKind};
