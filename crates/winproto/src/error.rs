//! The crate's one error type, and the three families of numeric status codes
//! a Windows peer answers with, each with its symbolic name.
//!
//! * [`NtStatus`]: what SMB2 puts in a response header (`STATUS_LOGON_FAILURE`).
//! * [`Win32Error`]: what MS-RRP and MS-SCMR methods return
//!   (`ERROR_SERVICE_EXISTS`).
//! * [`RpcFaultStatus`]: what a DCE/RPC fault PDU carries
//!   (`nca_s_op_rng_error`).
//!
//! Unknown codes still format, as hex, so nothing a peer sends is lost.

use std::fmt;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The TCP connection to the target could not be opened or broke.
    #[error("cannot reach {address}: {source}; check that the host is up and that TCP port {port} is open", port = address.port())]
    Connect {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    /// Opening the connection took longer than the configured timeout.
    #[error("connecting to {address} timed out after {timeout:?}")]
    ConnectTimeout { address: std::net::SocketAddr, timeout: std::time::Duration },

    /// The server refused the user name or password (STATUS_LOGON_FAILURE and
    /// its relatives).
    #[error("logon to {server} as {user:?} refused: {status}; check the user name, the password and that the account is enabled")]
    LogonFailed { server: String, user: String, status: NtStatus },

    /// The server answered an SMB2 request with an error status.
    #[error("{operation} failed: {status}")]
    SmbStatus { operation: String, status: NtStatus },

    /// The SMB library failed for a reason that carries no NT status
    /// (negotiation, signature check, message parsing, ...).
    #[error("{operation} failed: {source}")]
    Smb {
        operation: String,
        #[source]
        source: Box<smb_rs::Error>,
    },

    /// The session policy asked for something the server cannot give
    /// (for example encryption from an SMB 2.1 server).
    #[error("security policy not met: {0}")]
    Policy(String),

    /// A caller passed a value this crate cannot send (a path with a NUL,
    /// a name too long for the wire format, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The server refused our DCE/RPC bind (bind_nak or no accepted context).
    #[error("DCE/RPC bind to {interface} refused: {reason}")]
    BindRejected { interface: &'static str, reason: String },

    /// The server answered a DCE/RPC request with a fault PDU.
    #[error("DCE/RPC fault from {interface} opnum {opnum}: {status}")]
    RpcFault { interface: &'static str, opnum: u16, status: RpcFaultStatus },

    /// A remote method returned a Win32 error code.
    #[error("{operation} failed: {code}")]
    Win32 { operation: &'static str, code: Win32Error },

    /// Bytes received from the peer that do not decode: the peer is broken or
    /// not what we think it is. Never a panic, never an unbounded allocation.
    #[error("malformed {what} from the peer: {detail}")]
    Malformed { what: &'static str, detail: String },

    /// A local I/O error while reading the data to stage or writing what was
    /// read.
    #[error("local I/O failed while {context}: {source}")]
    LocalIo {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The test harness could not start or drive the private Samba peer.
    #[cfg(feature = "test-support")]
    #[error("samba test peer: {0}")]
    Harness(String),
}

impl Error {
    /// The Win32 error code when this error is one, for callers that react to
    /// specific codes (`ERROR_SERVICE_EXISTS`, ...).
    pub fn win32_code(&self) -> Option<Win32Error> {
        match self {
            Error::Win32 { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The NT status when the server answered an SMB2 request with one.
    pub fn nt_status(&self) -> Option<NtStatus> {
        match self {
            Error::SmbStatus { status, .. } | Error::LogonFailed { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The fault status when the server answered with a DCE/RPC fault.
    pub fn rpc_fault(&self) -> Option<RpcFaultStatus> {
        match self {
            Error::RpcFault { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        Error::Malformed { what, detail: detail.into() }
    }

    /// Maps an error of the SMB library, keeping the NT status when there is one.
    pub(crate) fn from_smb(operation: impl Into<String>, error: smb_rs::Error) -> Self {
        let operation = operation.into();
        match smb_status_of(&error) {
            Some(status) => Error::SmbStatus { operation, status },
            None => Error::Smb { operation, source: Box::new(error) },
        }
    }
}

/// The NT status carried by an error of the SMB library, if any.
pub(crate) fn smb_status_of(error: &smb_rs::Error) -> Option<NtStatus> {
    match error {
        smb_rs::Error::UnexpectedMessageStatus(code) | smb_rs::Error::ReceivedErrorMessage(code, _) => {
            Some(NtStatus(*code))
        }
        _ => None,
    }
}

/// Declares a `u32` newtype with named constants and a name table.
macro_rules! named_codes {
    (
        $(#[$meta:meta])*
        $ty:ident, $fmt_prefix:literal {
            $( $(#[$cmeta:meta])* $name:ident = $value:literal, $text:literal; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $ty(pub u32);

        #[allow(missing_docs)]
        impl $ty {
            $( $(#[$cmeta])* pub const $name: $ty = $ty($value); )*

            /// The symbolic name, when the code is one this crate knows.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some(stringify!($name)), )*
                    _ => None,
                }
            }

            /// A short English description, when the code is known.
            pub fn description(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($text), )*
                    _ => None,
                }
            }

            /// The raw code.
            pub fn code(self) -> u32 {
                self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match (self.name(), self.description()) {
                    (Some(name), Some(text)) => write!(f, "{name} (0x{:08x}): {text}", self.0),
                    _ => write!(f, "{} 0x{:08x}", $fmt_prefix, self.0),
                }
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => write!(f, "{name}"),
                    None => write!(f, "{}(0x{:08x})", stringify!($ty), self.0),
                }
            }
        }
    };
}

named_codes! {
    /// A Win32 error code as returned by MS-RRP and MS-SCMR methods.
    Win32Error, "unknown Win32 error" {
        ERROR_SUCCESS = 0, "success";
        ERROR_FILE_NOT_FOUND = 2, "the key or value does not exist";
        ERROR_PATH_NOT_FOUND = 3, "the path does not exist";
        ERROR_ACCESS_DENIED = 5, "access denied; the account needs local administrator rights on the target";
        ERROR_INVALID_HANDLE = 6, "the handle is invalid or already closed";
        ERROR_NOT_ENOUGH_MEMORY = 8, "the server ran out of memory";
        ERROR_INVALID_DATA = 13, "the data is invalid";
        ERROR_NOT_SUPPORTED = 50, "the request is not supported";
        ERROR_INVALID_PARAMETER = 87, "a parameter is invalid";
        ERROR_CALL_NOT_IMPLEMENTED = 120, "the call is not implemented by the server";
        ERROR_INSUFFICIENT_BUFFER = 122, "the buffer is too small";
        ERROR_INVALID_NAME = 123, "the name is invalid";
        ERROR_INVALID_LEVEL = 124, "the information level is invalid";
        ERROR_MORE_DATA = 234, "more data is available than the buffer holds";
        ERROR_NO_MORE_ITEMS = 259, "no more items";
        ERROR_BADKEY = 1010, "the registry key is invalid";
        ERROR_CANTOPEN = 1011, "the registry key cannot be opened";
        ERROR_CANTREAD = 1012, "the registry key cannot be read";
        ERROR_KEY_DELETED = 1018, "the registry key is marked for deletion";
        ERROR_DEPENDENT_SERVICES_RUNNING = 1051, "other running services depend on this service";
        ERROR_INVALID_SERVICE_CONTROL = 1052, "the control is not valid for this service";
        ERROR_SERVICE_REQUEST_TIMEOUT = 1053, "the service did not respond to the start or control request in time";
        ERROR_SERVICE_NO_THREAD = 1054, "no thread could be created for the service";
        ERROR_SERVICE_DATABASE_LOCKED = 1055, "the service database is locked";
        ERROR_SERVICE_ALREADY_RUNNING = 1056, "the service is already running";
        ERROR_INVALID_SERVICE_ACCOUNT = 1057, "the account name is invalid or does not exist, or the password is wrong";
        ERROR_SERVICE_DISABLED = 1058, "the service is disabled";
        ERROR_CIRCULAR_DEPENDENCY = 1059, "circular service dependency";
        ERROR_SERVICE_DOES_NOT_EXIST = 1060, "the service does not exist";
        ERROR_SERVICE_CANNOT_ACCEPT_CTRL = 1061, "the service cannot accept control messages now";
        ERROR_SERVICE_NOT_ACTIVE = 1062, "the service has not been started";
        ERROR_DATABASE_DOES_NOT_EXIST = 1065, "the service database does not exist";
        ERROR_SERVICE_SPECIFIC_ERROR = 1066, "the service returned a service-specific error";
        ERROR_SERVICE_DEPENDENCY_FAIL = 1068, "a dependency service failed to start";
        ERROR_SERVICE_LOGON_FAILED = 1069, "the service could not log on; check the account's password and its 'log on as a service' right";
        ERROR_SERVICE_MARKED_FOR_DELETE = 1072, "the service is marked for deletion; it disappears once every handle to it is closed";
        ERROR_SERVICE_EXISTS = 1073, "the service already exists";
        ERROR_DUPLICATE_SERVICE_NAME = 1078, "the name is already in use as a service name or display name";
        ERROR_SHUTDOWN_IN_PROGRESS = 1115, "the system is shutting down";
        RPC_S_PROCNUM_OUT_OF_RANGE = 1745, "the procedure number is out of range";
    }
}

named_codes! {
    /// An NT status code from an SMB2 response header.
    NtStatus, "NT status" {
        STATUS_SUCCESS = 0x0000_0000, "success";
        STATUS_BUFFER_OVERFLOW = 0x8000_0005, "the data was too large for the buffer";
        STATUS_NO_MORE_FILES = 0x8000_0006, "no more files";
        STATUS_INVALID_PARAMETER = 0xC000_000D, "a parameter is invalid";
        STATUS_NO_SUCH_FILE = 0xC000_000F, "the file does not exist";
        STATUS_END_OF_FILE = 0xC000_0011, "end of file";
        STATUS_ACCESS_DENIED = 0xC000_0022, "access denied; the account needs rights on the share and the file";
        STATUS_OBJECT_NAME_INVALID = 0xC000_0033, "the file name is invalid";
        STATUS_OBJECT_NAME_NOT_FOUND = 0xC000_0034, "the file does not exist";
        STATUS_OBJECT_NAME_COLLISION = 0xC000_0035, "the file already exists";
        STATUS_OBJECT_PATH_NOT_FOUND = 0xC000_003A, "a directory on the path does not exist";
        STATUS_SHARING_VIOLATION = 0xC000_0043, "the file is in use by another process";
        STATUS_DELETE_PENDING = 0xC000_0056, "the file is being deleted";
        STATUS_LOGON_FAILURE = 0xC000_006D, "unknown user name or bad password";
        STATUS_ACCOUNT_RESTRICTION = 0xC000_006E, "the account is restricted (for example a blank password)";
        STATUS_PASSWORD_EXPIRED = 0xC000_0071, "the password has expired";
        STATUS_ACCOUNT_DISABLED = 0xC000_0072, "the account is disabled";
        STATUS_DISK_FULL = 0xC000_007F, "the disk is full";
        STATUS_PIPE_NOT_AVAILABLE = 0xC000_00AC, "the named pipe is not available";
        STATUS_FILE_IS_A_DIRECTORY = 0xC000_00BA, "the path names a directory";
        STATUS_NOT_SUPPORTED = 0xC000_00BB, "the request is not supported";
        STATUS_NETWORK_NAME_DELETED = 0xC000_00C9, "the share was removed";
        STATUS_BAD_NETWORK_NAME = 0xC000_00CC, "the share does not exist";
        STATUS_DIRECTORY_NOT_EMPTY = 0xC000_0101, "the directory is not empty";
        STATUS_NOT_A_DIRECTORY = 0xC000_0103, "a component of the path is not a directory";
        STATUS_PIPE_BROKEN = 0xC000_014B, "the pipe was closed by the server";
        STATUS_USER_SESSION_DELETED = 0xC000_0203, "the session was closed by the server";
        STATUS_ACCOUNT_LOCKED_OUT = 0xC000_0234, "the account is locked out";
    }
}

named_codes! {
    /// The status of a DCE/RPC fault PDU (C706 appendix E, MS-RPCE 2.2.2.11).
    RpcFaultStatus, "DCE/RPC fault status" {
        #[doc = "Also `rpc_s_access_denied`."]
        NCA_S_ACCESS_DENIED = 0x0000_0005, "access denied";
        RPC_S_PROCNUM_OUT_OF_RANGE = 0x0000_06D1, "the procedure number is out of range";
        RPC_S_CANNOT_SUPPORT = 0x0000_06E4, "the requested operation is not supported";
        NCA_S_FAULT_NDR = 0x0000_06F7, "the server could not decode the request stub (bad stub data)";
        NCA_S_FAULT_INT_DIV_BY_ZERO = 0x1C00_0001, "integer division by zero";
        NCA_S_FAULT_ADDR_ERROR = 0x1C00_0002, "address error";
        NCA_S_FAULT_INVALID_TAG = 0x1C00_0006, "invalid union tag";
        NCA_S_FAULT_INVALID_BOUND = 0x1C00_0007, "invalid array bound";
        NCA_S_RPC_VERSION_MISMATCH = 0x1C00_0008, "RPC protocol version mismatch";
        NCA_S_UNSPEC_REJECT = 0x1C00_0009, "request rejected for an unspecified reason";
        NCA_S_MANAGER_NOT_ENTERED = 0x1C00_000C, "the server manager routine was not entered";
        NCA_S_FAULT_CANCEL = 0x1C00_000D, "the call was cancelled";
        NCA_S_FAULT_UNSPEC = 0x1C00_0012, "unspecified fault";
        NCA_S_FAULT_REMOTE_COMM_FAILURE = 0x1C00_0013, "remote communication failure";
        NCA_S_FAULT_CONTEXT_MISMATCH = 0x1C00_001A, "the context handle is unknown to the server";
        NCA_S_FAULT_REMOTE_NO_MEMORY = 0x1C00_001B, "the server ran out of memory";
        NCA_S_INVALID_PRES_CONTEXT_ID = 0x1C00_001C, "invalid presentation context id";
        NCA_S_UNSUPPORTED_AUTHN_LEVEL = 0x1C00_001D, "unsupported authentication level";
        NCA_S_FAULT_USER_DEFINED = 0x1C00_0021, "user-defined fault";
        NCA_S_COMM_FAILURE = 0x1C01_0001, "communication failure";
        #[doc = "`nca_s_op_rng_error`: the server does not implement this operation number (Samba for CreateServiceW and DeleteService)."]
        NCA_S_OP_RNG_ERROR = 0x1C01_0002, "the server does not implement this operation (nca_s_op_rng_error)";
        NCA_S_UNK_IF = 0x1C01_0003, "unknown interface";
        NCA_S_WRONG_BOOT_TIME = 0x1C01_0006, "wrong boot time";
        NCA_S_YOU_CRASHED = 0x1C01_0009, "server restarted";
        NCA_S_PROTO_ERROR = 0x1C01_000B, "protocol error";
        NCA_S_OUT_ARGS_TOO_BIG = 0x1C01_0013, "output arguments too big";
        NCA_S_SERVER_TOO_BUSY = 0x1C01_0014, "server too busy";
        NCA_S_UNSUPPORTED_TYPE = 0x1C01_0017, "unsupported type";
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_format_with_name_and_hex() {
        assert_eq!(
            Win32Error::ERROR_SERVICE_EXISTS.to_string(),
            "ERROR_SERVICE_EXISTS (0x00000431): the service already exists"
        );
        assert_eq!(Win32Error(0x424).name(), Some("ERROR_SERVICE_DOES_NOT_EXIST"));
        assert_eq!(Win32Error(0x420).name(), Some("ERROR_SERVICE_ALREADY_RUNNING"));
        assert_eq!(Win32Error(0x430).name(), Some("ERROR_SERVICE_MARKED_FOR_DELETE"));
        assert_eq!(RpcFaultStatus(0x1c01_0002).name(), Some("NCA_S_OP_RNG_ERROR"));
        assert_eq!(NtStatus(0xC000_006D).name(), Some("STATUS_LOGON_FAILURE"));
    }

    #[test]
    fn unknown_codes_still_format() {
        assert_eq!(Win32Error(0xdead).to_string(), "unknown Win32 error 0x0000dead");
        assert_eq!(format!("{:?}", NtStatus(1)), "NtStatus(0x00000001)");
    }
}
