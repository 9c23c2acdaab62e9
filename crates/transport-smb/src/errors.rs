//! Protocol errors in the administrator's terms: each names its likely cause and
//! fix, and whether the step is retried.

use super::*;

/// Whether the error says a file or folder is not there.
pub(crate) fn is_not_found(error: &fleetpatch_winproto::Error) -> bool {
    matches!(
        error.nt_status(),
        Some(
            NtStatus::STATUS_OBJECT_NAME_NOT_FOUND
                | NtStatus::STATUS_OBJECT_PATH_NOT_FOUND
                | NtStatus::STATUS_NO_SUCH_FILE
        )
    )
}

/// Maps a protocol error to a transport error with the administrator's view
/// of the cause.
pub(crate) fn map_error(address: &str, step: &'static str, user: &str, error: fleetpatch_winproto::Error) -> Error {
    use fleetpatch_winproto::Error as E;
    let address = address.to_owned();
    match error {
        E::Connect { source, .. } => Error::Unreachable {
            address,
            reason: format!("{source}; check that the host is up, that TCP port 445 (or the configured port) is open in its firewall"),
        },
        E::ConnectTimeout { timeout, .. } => Error::Timeout { address, step, seconds: timeout.as_secs().max(1) },
        E::LogonFailed { status, .. } => Error::Authentication {
            address,
            username: user.to_owned(),
            reason: format!("{status}; check the user name (DOMAIN\\user or .\\user), the password, and that the account is enabled"),
        },
        E::SmbStatus { operation, status } => match status {
            NtStatus::STATUS_ACCESS_DENIED => Error::PermissionDenied {
                address,
                reason: format!(
                    "{operation}: {status}; the account needs local administrator rights, and a local account \
                     needs LocalAccountTokenFilterPolicy = 1 (UAC remote restrictions)"
                ),
            },
            NtStatus::STATUS_BAD_NETWORK_NAME => Error::Remote {
                address,
                reason: format!(
                    "{operation}: {status}; the admin shares may be disabled (AutoShareServer / AutoShareWks = 0) \
                     or [smb].share names a share the target does not have"
                ),
                transient: false,
            },
            NtStatus::STATUS_DISK_FULL => {
                Error::Remote { address, reason: format!("{operation}: {status}; free space on the target"), transient: false }
            }
            NtStatus::STATUS_PIPE_NOT_AVAILABLE | NtStatus::STATUS_OBJECT_NAME_NOT_FOUND if step == "registry" => {
                Error::Remote {
                    address,
                    reason: format!(
                        "{operation}: {status}; the Remote Registry service is not running on the target \
                         (sc config RemoteRegistry start= auto, then sc start RemoteRegistry)"
                    ),
                    transient: false,
                }
            }
            NtStatus::STATUS_USER_SESSION_DELETED
            | NtStatus::STATUS_NETWORK_NAME_DELETED
            | NtStatus::STATUS_PIPE_BROKEN
            | NtStatus::STATUS_SHARING_VIOLATION => {
                Error::Remote { address, reason: format!("{operation}: {status}"), transient: true }
            }
            _ => Error::Remote { address, reason: format!("{operation}: {status}"), transient: false },
        },
        E::Win32 { operation, code } if code == Win32Error::ERROR_ACCESS_DENIED => Error::PermissionDenied {
            address,
            reason: format!(
                "{operation}: {code}; the account needs local administrator rights, and a local account needs \
                 LocalAccountTokenFilterPolicy = 1 (UAC remote restrictions)"
            ),
        },
        E::Win32 { operation, code } if code == Win32Error::ERROR_SERVICE_LOGON_FAILED => Error::PermissionDenied {
            address,
            reason: format!(
                "{operation}: {code}; the agent service's account lacks the 'Log on as a service' right (secpol.msc, \
                 User Rights Assignment) or its password is wrong; or run the agent as LocalSystem \
                 (smb.service_account = \"local_system\")"
            ),
        },
        E::Win32 { operation, code } if code == Win32Error::ERROR_SERVICE_MARKED_FOR_DELETE => Error::Remote {
            address,
            reason: format!(
                "{operation}: {code}; an earlier agent service of this deployment goes once every handle to it is \
                 closed (close the Services console on the target); retried"
            ),
            transient: true,
        },
        E::Win32 { operation, code } if code == Win32Error::ERROR_SERVICE_EXISTS => Error::Remote {
            address,
            reason: format!(
                "{operation}: {code}; a service of this name is left from an earlier attempt; the cleanup removes \
                 it and the deployment is retried"
            ),
            transient: true,
        },
        E::RpcFault { interface, opnum, status } if status == RpcFaultStatus::NCA_S_OP_RNG_ERROR => Error::NotSupported {
            address,
            reason: format!(
                "the server does not implement this {interface} operation (opnum {opnum} answered with the DCE/RPC \
                 fault {status}); it is not a Windows service manager (Samba cannot create services), so the agent \
                 cannot be installed there"
            ),
        },
        E::Smb { .. } => Error::Remote { address, reason: error.to_string(), transient: true },
        E::LocalIo { context, source } => Error::LocalFile { path: context.into(), reason: source.to_string() },
        other => Error::Remote { address, reason: other.to_string(), transient: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_errors_become_the_administrators_causes() {
        let fault = fleetpatch_winproto::Error::RpcFault {
            interface: "svcctl",
            opnum: 12,
            status: RpcFaultStatus::NCA_S_OP_RNG_ERROR,
        };
        let error = map_error("h:445", "start agent", "", fault);
        assert!(matches!(error, Error::NotSupported { .. }));
        assert!(error.to_string().contains("does not implement"), "{error}");
        assert!(!error.is_transient());

        let denied = fleetpatch_winproto::Error::SmbStatus {
            operation: "connecting share C$".into(),
            status: NtStatus::STATUS_ACCESS_DENIED,
        };
        let error = map_error("h:445", "stage", "", denied);
        assert!(error.to_string().contains("LocalAccountTokenFilterPolicy"), "{error}");

        let no_share = fleetpatch_winproto::Error::SmbStatus {
            operation: "connecting share C$".into(),
            status: NtStatus::STATUS_BAD_NETWORK_NAME,
        };
        assert!(map_error("h:445", "stage", "", no_share).to_string().contains("AutoShareServer"));
    }

    /// Every error a Windows administrator meets on the service manager,
    /// fed to the mapping: its name, its fix, and whether it is retried.
    #[test]
    fn service_manager_errors_name_their_fix() {
        let cases = [
            (Win32Error::ERROR_ACCESS_DENIED, "LocalAccountTokenFilterPolicy", false),
            (Win32Error::ERROR_SERVICE_LOGON_FAILED, "Log on as a service", false),
            (Win32Error::ERROR_SERVICE_MARKED_FOR_DELETE, "close the Services console", true),
            (Win32Error::ERROR_SERVICE_EXISTS, "the cleanup removes it", true),
        ];
        for (code, fix, transient) in cases {
            let error = map_error(
                "h:445",
                "start agent",
                "",
                fleetpatch_winproto::Error::Win32 { operation: "RStartServiceW", code },
            );
            let text = error.to_string();
            let name = code.name().expect("a named code");
            assert!(text.contains(name) && text.contains(fix), "{name}: {text}");
            assert_eq!(error.is_transient(), transient, "{name}: {text}");
        }
    }
}
