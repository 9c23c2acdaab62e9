#!/usr/bin/python3
"""Conformance vectors for fleetpatch-winproto, produced by Impacket.

For every MS-RRP and MS-SCMR call the crate encodes, this builds the request
with Impacket's NDR classes from the arguments listed below and records the
stub bytes; for every reply it builds a sample reply with Impacket, records
its bytes and the values Impacket parses back from them. The Rust test
`tests/vectors.rs` checks that our encoder produces the same bytes and our
decoder the same values.

Two things of Impacket's encoder are pinned, because NDR leaves them free and
Impacket picks them at random or arbitrarily:
  * referent ids of non-null unique pointers: 0x00020000 + 4*n in wire order
    (Windows' choice, and ours) instead of random numbers;
  * alignment padding: zero bytes instead of Impacket's fillers (0xaa, 0xab,
    0xbf), by loading impacket's ndr module with those literals replaced.
Nothing else is changed.

Run with Debian's interpreter, which has Impacket:
    /usr/bin/python3 scripts/gen_vectors.py > vectors/impacket.json
"""

import importlib.util
import json
import sys

import impacket.dcerpc.v5  # noqa: F401  (parent package first)


def _load_ndr_with_zero_padding():
    spec = importlib.util.find_spec("impacket.dcerpc.v5.ndr")
    with open(spec.origin, encoding="utf-8") as source_file:
        source = source_file.read()
    fillers = ("b'\\xaa'", "b'\\xAA'", "b'\\xab'", "b'\\xAB'", "b'\\xbf'", "b'\\xBF'")
    for filler in fillers:
        source = source.replace(filler, "b'\\x00'")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, spec.origin, "exec"), module.__dict__)
    return module


ndr = _load_ndr_with_zero_padding()

from impacket.dcerpc.v5 import rrp, scmr  # noqa: E402  (after the ndr patch)
from impacket.dcerpc.v5.dtypes import NULL  # noqa: E402

_next_referent = [0x00020000]


def _reset_referents():
    _next_referent[0] = 0x00020000


def _pointer_get_data(self, soFar=0):
    data = b""
    pad = self.calculatePad(self.commonHdr[0][1], soFar)
    if pad > 0:
        soFar += pad
        data = b"\x00" * pad
    if self.fields["ReferentID"] == 0:
        if len(self.referent) > 0:
            self["Data"] = b""
        else:
            return data + b"\x00" * 4
    else:
        self.fields["ReferentID"] = _next_referent[0]
        _next_referent[0] += 4
    return data + ndr.NDRSTRUCT.getData(self, soFar)


ndr.NDRPOINTER.getData = _pointer_get_data

# A context handle: attributes 0, then a UUID of 1..16.
# SC_MANAGER_ALL_ACCESS (Impacket has no constant for it).
SC_MANAGER_ALL_ACCESS = 0x000F003F
# SERVICE_WIN32 (own-process and share-process services; no Impacket constant).
SERVICE_WIN32 = 0x30

HANDLE = bytes(4) + bytes(range(1, 17))
HANDLE_HEX = HANDLE.hex()


def hkey(raw=HANDLE):
    handle = rrp.RPC_HKEY()
    handle["context_handle_attributes"] = int.from_bytes(raw[:4], "little")
    handle["context_handle_uuid"] = raw[4:]
    return handle


def sc_handle(raw=HANDLE):
    return scmr.SC_RPC_HANDLE(raw)


def stub(request):
    _reset_referents()
    return request.getData().hex()


def utf16z(text):
    return (text + "\x00").encode("utf-16le")


def set_empty_unicode_buffer(field, capacity_bytes):
    """An RRP_UNICODE_STRING with Length 0, MaximumLength capacity and an
    empty varying array of capacity/2 elements (what a client sends to get
    a name back)."""
    field.fields["MaximumLength"] = capacity_bytes
    field.fields["Data"].fields["Data"].fields["MaximumCount"] = capacity_bytes // 2


def value_buffers(request, size):
    """lpType -> 0, lpData -> empty buffer of `size`, lpcbData -> size,
    lpcbLen -> 0 (what Windows' client sends)."""
    request["lpType"] = 0
    request["lpData"] = b""
    request.fields["lpData"].fields["Data"].fields["MaximumCount"] = size
    request["lpcbData"] = size
    request["lpcbLen"] = 0


def requests():
    out = []

    r = rrp.OpenLocalMachine()
    r["ServerName"] = NULL
    r["samDesired"] = rrp.MAXIMUM_ALLOWED
    out.append({"call": "OpenLocalMachine", "opnum": r.opnum,
                "args": {"sam_desired": rrp.MAXIMUM_ALLOWED}, "stub": stub(r)})

    sub_key = "SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Uninstall\\KB5031356"
    r = rrp.BaseRegOpenKey()
    r["hKey"] = hkey()
    r["lpSubKey"] = sub_key + "\x00"
    r["dwOptions"] = 0
    r["samDesired"] = rrp.KEY_QUERY_VALUE
    out.append({"call": "BaseRegOpenKey", "opnum": r.opnum,
                "args": {"key": HANDLE_HEX, "sub_key": sub_key, "options": 0,
                         "sam_desired": rrp.KEY_QUERY_VALUE},
                "stub": stub(r)})

    for name, size in (("DisplayName", 512), ("CurrentVersion", 4096), ("", 64)):
        r = rrp.BaseRegQueryValue()
        r["hKey"] = hkey()
        r["lpValueName"] = name + "\x00"
        value_buffers(r, size)
        out.append({"call": "BaseRegQueryValue", "opnum": r.opnum,
                    "args": {"key": HANDLE_HEX, "value_name": name, "buffer_size": size},
                    "stub": stub(r)})

    r = rrp.BaseRegEnumKey()
    r["hKey"] = hkey()
    r["dwIndex"] = 3
    set_empty_unicode_buffer(r.fields["lpNameIn"], 512)
    r["lpClassIn"] = ""
    set_empty_unicode_buffer(r.fields["lpClassIn"].fields["Data"], 512)
    r["lpftLastWriteTime"]["dwLowDateTime"] = 0
    r["lpftLastWriteTime"]["dwHighDateTime"] = 0
    out.append({"call": "BaseRegEnumKey", "opnum": r.opnum,
                "args": {"key": HANDLE_HEX, "index": 3, "name_buffer_bytes": 512,
                         "class_buffer_bytes": 512},
                "stub": stub(r)})

    r = rrp.BaseRegEnumValue()
    r["hKey"] = hkey()
    r["dwIndex"] = 1
    set_empty_unicode_buffer(r.fields["lpValueNameIn"], 32768)
    value_buffers(r, 1024)
    out.append({"call": "BaseRegEnumValue", "opnum": r.opnum,
                "args": {"key": HANDLE_HEX, "index": 1, "name_buffer_bytes": 32768,
                         "data_buffer_size": 1024},
                "stub": stub(r)})

    r = rrp.BaseRegCloseKey()
    r["hKey"] = hkey()
    out.append({"call": "BaseRegCloseKey", "opnum": r.opnum,
                "args": {"key": HANDLE_HEX}, "stub": stub(r)})

    for machine, database, access in (("127.0.0.1", "ServicesActive", SC_MANAGER_ALL_ACCESS),
                                      (None, None, scmr.SC_MANAGER_CONNECT)):
        r = scmr.ROpenSCManagerW()
        r["lpMachineName"] = NULL if machine is None else machine + "\x00"
        r["lpDatabaseName"] = NULL if database is None else database + "\x00"
        r["dwDesiredAccess"] = access
        out.append({"call": "ROpenSCManagerW", "opnum": r.opnum,
                    "args": {"machine_name": machine, "database_name": database,
                             "desired_access": access},
                    "stub": stub(r)})

    create_cases = (
        {"service_name": "fleetpatch-7f3a", "display_name": "fleetpatch agent 7f3a",
         "binary_path_name": "C:\\Windows\\Patches\\7f3a\\fleetpatch-agent.exe --plan plan.json",
         "service_start_name": None, "password": None},
        {"service_name": "fleetpatch-b", "display_name": "fleetpatch agent (b)",
         "binary_path_name": "\"C:\\Program Files\\x y\\agent.exe\"",
         "service_start_name": ".\\deploy", "password": "S3cret!pw"},
    )
    for case in create_cases:
        r = scmr.RCreateServiceW()
        r["hSCManager"] = sc_handle()
        r["lpServiceName"] = case["service_name"] + "\x00"
        r["lpDisplayName"] = case["display_name"] + "\x00"
        r["dwDesiredAccess"] = scmr.SERVICE_ALL_ACCESS
        r["dwServiceType"] = scmr.SERVICE_WIN32_OWN_PROCESS
        r["dwStartType"] = scmr.SERVICE_DEMAND_START
        r["dwErrorControl"] = scmr.SERVICE_ERROR_NORMAL
        r["lpBinaryPathName"] = case["binary_path_name"] + "\x00"
        r["lpLoadOrderGroup"] = NULL
        r["lpdwTagId"] = NULL
        r["lpDependencies"] = NULL
        r["dwDependSize"] = 0
        if case["service_start_name"] is None:
            r["lpServiceStartName"] = NULL
            r["lpPassword"] = NULL
            r["dwPwSize"] = 0
        else:
            password = utf16z(case["password"])
            r["lpServiceStartName"] = case["service_start_name"] + "\x00"
            r["lpPassword"] = list(password)
            r["dwPwSize"] = len(password)
        args = dict(case, key=HANDLE_HEX)
        out.append({"call": "RCreateServiceW", "opnum": r.opnum, "args": args, "stub": stub(r)})

    r = scmr.ROpenServiceW()
    r["hSCManager"] = sc_handle()
    r["lpServiceName"] = "Spooler\x00"
    r["dwDesiredAccess"] = scmr.SERVICE_START | scmr.SERVICE_STOP | scmr.SERVICE_QUERY_STATUS
    out.append({"call": "ROpenServiceW", "opnum": r.opnum,
                "args": {"key": HANDLE_HEX, "service_name": "Spooler",
                         "desired_access": scmr.SERVICE_START | scmr.SERVICE_STOP | scmr.SERVICE_QUERY_STATUS},
                "stub": stub(r)})

    for arguments in ([], ["--plan", "C:\\Windows\\Patches\\plan.json"]):
        r = scmr.RStartServiceW()
        r["hService"] = sc_handle()
        r["argc"] = len(arguments)
        if not arguments:
            r["argv"] = NULL
        else:
            for item in arguments:
                element = scmr.LPWSTR()
                element["Data"] = item + "\x00"
                r["argv"].append(element)
        out.append({"call": "RStartServiceW", "opnum": r.opnum,
                    "args": {"key": HANDLE_HEX, "arguments": arguments}, "stub": stub(r)})

    r = scmr.RQueryServiceStatus()
    r["hService"] = sc_handle()
    out.append({"call": "RQueryServiceStatus", "opnum": r.opnum,
                "args": {"key": HANDLE_HEX}, "stub": stub(r)})

    r = scmr.RControlService()
    r["hService"] = sc_handle()
    r["dwControl"] = scmr.SERVICE_CONTROL_STOP
    out.append({"call": "RControlService", "opnum": r.opnum,
                "args": {"key": HANDLE_HEX, "control": scmr.SERVICE_CONTROL_STOP},
                "stub": stub(r)})

    r = scmr.RDeleteService()
    r["hService"] = sc_handle()
    out.append({"call": "RDeleteService", "opnum": r.opnum,
                "args": {"key": HANDLE_HEX}, "stub": stub(r)})

    r = scmr.RCloseServiceHandle()
    r["hSCObject"] = sc_handle()
    out.append({"call": "RCloseServiceHandle", "opnum": r.opnum,
                "args": {"key": HANDLE_HEX}, "stub": stub(r)})

    # What ServiceControlManager::list_services sends first, a resumed call
    # with the largest buffer, and Impacket's own hREnumServicesStatusW
    # defaults (every type but drivers of the interactive kind, no buffer,
    # no resume index).
    impacket_default_type = (scmr.SERVICE_WIN32_OWN_PROCESS | scmr.SERVICE_KERNEL_DRIVER
                             | scmr.SERVICE_FILE_SYSTEM_DRIVER | scmr.SERVICE_WIN32_SHARE_PROCESS
                             | scmr.SERVICE_INTERACTIVE_PROCESS)
    for service_type, state, size, resume in ((SERVICE_WIN32, scmr.SERVICE_STATE_ALL, 16384, 0),
                                              (SERVICE_WIN32, scmr.SERVICE_ACTIVE, 262144, 7),
                                              (impacket_default_type, scmr.SERVICE_STATE_ALL, 0, None)):
        r = scmr.REnumServicesStatusW()
        r["hSCManager"] = sc_handle()
        r["dwServiceType"] = service_type
        r["dwServiceState"] = state
        r["cbBufSize"] = size
        r["lpResumeIndex"] = NULL if resume is None else resume
        out.append({"call": "REnumServicesStatusW", "opnum": r.opnum,
                    "args": {"key": HANDLE_HEX, "service_type": service_type, "service_state": state,
                             "buffer_size": size, "resume_index": resume},
                    "stub": stub(r)})
    return out


def reply(name, response, fields):
    """Encodes `response`, parses the bytes back with Impacket and records
    what Impacket read."""
    data = stub(response)
    parsed = type(response)(bytes.fromhex(data))
    return {"reply": name, "stub": data, "parsed": fields(parsed)}


def blob(value):
    if value is None or value == NULL:
        return None
    return b"".join(x if isinstance(x, bytes) else bytes([x]) for x in value).hex()


def handle_hex(value):
    return bytes(value.getData()).hex() if hasattr(value, "getData") else bytes(value).hex()


def unicode_or_none(value):
    if value is None or value == NULL or value == b"" or value == "":
        return None
    return value.rstrip("\x00")


def replies():
    out = []

    r = rrp.OpenLocalMachineResponse()
    r["phKey"] = hkey()
    r["ErrorCode"] = 0
    out.append(reply("KeyHandle", r, lambda p: {"handle": handle_hex(p["phKey"]), "status": p["ErrorCode"]}))

    r = rrp.BaseRegOpenKeyResponse()
    r["phkResult"] = hkey(bytes(20))
    r["ErrorCode"] = 2
    out.append(reply("KeyHandle", r, lambda p: {"handle": handle_hex(p["phkResult"]), "status": p["ErrorCode"]}))

    value = utf16z("6.1")
    r = rrp.BaseRegQueryValueResponse()
    r["lpType"] = rrp.REG_SZ
    r["lpData"] = list(value)
    r["lpcbData"] = len(value)
    r["lpcbLen"] = len(value)
    r["ErrorCode"] = 0
    out.append(reply("BaseRegQueryValue", r, lambda p: {
        "value_type": p["lpType"], "data": blob(p["lpData"]),
        "data_size": p["lpcbData"], "data_length": p["lpcbLen"], "status": p["ErrorCode"]}))

    r = rrp.BaseRegQueryValueResponse()
    r["lpType"] = rrp.REG_SZ
    r["lpData"] = NULL
    r["lpcbData"] = 9000
    r["lpcbLen"] = 0
    r["ErrorCode"] = 234
    out.append(reply("BaseRegQueryValue", r, lambda p: {
        "value_type": p["lpType"], "data": None,
        "data_size": p["lpcbData"], "data_length": p["lpcbLen"], "status": p["ErrorCode"]}))

    r = rrp.BaseRegEnumKeyResponse()
    r["lpNameOut"] = "KB5031356\x00"
    r["lplpClassOut"] = NULL
    r["lpftLastWriteTime"]["dwLowDateTime"] = 0x89ABCDEF
    r["lpftLastWriteTime"]["dwHighDateTime"] = 0x01D9F0A1
    r["ErrorCode"] = 0
    out.append(reply("BaseRegEnumKey", r, lambda p: {
        "name": unicode_or_none(p["lpNameOut"]),
        "last_write_time": (p["lpftLastWriteTime"]["dwHighDateTime"] << 32) | p["lpftLastWriteTime"]["dwLowDateTime"],
        "status": p["ErrorCode"]}))

    r = rrp.BaseRegEnumValueResponse()
    r["lpValueNameOut"] = "InstallState\x00"
    r["lpType"] = rrp.REG_DWORD
    r["lpData"] = list((0x70).to_bytes(4, "little"))
    r["lpcbData"] = 4
    r["lpcbLen"] = 4
    r["ErrorCode"] = 0
    out.append(reply("BaseRegEnumValue", r, lambda p: {
        "name": unicode_or_none(p["lpValueNameOut"]), "value_type": p["lpType"],
        "data": blob(p["lpData"]), "data_size": p["lpcbData"],
        "data_length": p["lpcbLen"], "status": p["ErrorCode"]}))

    r = rrp.BaseRegCloseKeyResponse()
    r["hKey"] = hkey(bytes(20))
    r["ErrorCode"] = 0
    out.append(reply("KeyHandle", r, lambda p: {"handle": handle_hex(p["hKey"]), "status": p["ErrorCode"]}))

    r = scmr.ROpenSCManagerWResponse()
    r["lpScHandle"] = sc_handle()
    r["ErrorCode"] = 0
    out.append(reply("ServiceHandle", r, lambda p: {"handle": handle_hex(p["lpScHandle"]), "status": p["ErrorCode"]}))

    r = scmr.ROpenServiceWResponse()
    r["lpServiceHandle"] = sc_handle(bytes(20))
    r["ErrorCode"] = 0x424
    out.append(reply("ServiceHandle", r, lambda p: {"handle": handle_hex(p["lpServiceHandle"]), "status": p["ErrorCode"]}))

    r = scmr.RCreateServiceWResponse()
    r["lpdwTagId"] = NULL
    r["lpServiceHandle"] = sc_handle(bytes(20))
    r["ErrorCode"] = 0x431
    out.append(reply("RCreateServiceW", r, lambda p: {
        "tag_id": None, "handle": handle_hex(p["lpServiceHandle"]), "status": p["ErrorCode"]}))

    # (Impacket declares the reply's lpdwTagId as a string pointer, so a
    # non-null tag id cannot be built with it; only the NULL case is here.)

    for status in (0, 0x420, 0x430):
        r = scmr.RStartServiceWResponse()
        r["ErrorCode"] = status
        out.append(reply("Status", r, lambda p: {"status": p["ErrorCode"]}))

    def service_status(p):
        s = p["lpServiceStatus"]
        return {"service_type": s["dwServiceType"], "current_state": s["dwCurrentState"],
                "controls_accepted": s["dwControlsAccepted"], "win32_exit_code": s["dwWin32ExitCode"],
                "service_specific_exit_code": s["dwServiceSpecificExitCode"],
                "check_point": s["dwCheckPoint"], "wait_hint": s["dwWaitHint"],
                "status": p["ErrorCode"]}

    r = scmr.RQueryServiceStatusResponse()
    for key, value in (("dwServiceType", 0x110), ("dwCurrentState", 4), ("dwControlsAccepted", 5),
                       ("dwWin32ExitCode", 0), ("dwServiceSpecificExitCode", 0),
                       ("dwCheckPoint", 0), ("dwWaitHint", 0)):
        r["lpServiceStatus"][key] = value
    r["ErrorCode"] = 0
    out.append(reply("ServiceStatus", r, service_status))

    r = scmr.RControlServiceResponse()
    for key, value in (("dwServiceType", 0x10), ("dwCurrentState", 3), ("dwControlsAccepted", 0),
                       ("dwWin32ExitCode", 0), ("dwServiceSpecificExitCode", 0),
                       ("dwCheckPoint", 2), ("dwWaitHint", 3000)):
        r["lpServiceStatus"][key] = value
    r["ErrorCode"] = 0x426
    out.append(reply("ServiceStatus", r, service_status))

    r = scmr.RDeleteServiceResponse()
    r["ErrorCode"] = 0x430
    out.append(reply("Status", r, lambda p: {"status": p["ErrorCode"]}))

    r = scmr.RCloseServiceHandleResponse()
    r["hSCObject"] = sc_handle(bytes(20))
    r["ErrorCode"] = 0
    out.append(reply("ServiceHandle", r, lambda p: {"handle": handle_hex(p["hSCObject"]), "status": p["ErrorCode"]}))

    out.extend(enum_services_replies())
    return out


STATUS_FIELDS = (("service_type", "dwServiceType"), ("current_state", "dwCurrentState"),
                 ("controls_accepted", "dwControlsAccepted"), ("win32_exit_code", "dwWin32ExitCode"),
                 ("service_specific_exit_code", "dwServiceSpecificExitCode"),
                 ("check_point", "dwCheckPoint"), ("wait_hint", "dwWaitHint"))


def enum_service_buffer(services, size, strings_at_end):
    """The lpBuffer of REnumServicesStatusW: an array of ENUM_SERVICE_STATUSW
    whose two string pointers are 32-bit offsets from the buffer's start to
    NUL-terminated UTF-16LE strings, zero-filled to `size` bytes. The strings
    follow the records in order (as Samba lays them out), or are packed from
    the end of the buffer backwards (`strings_at_end`)."""
    records = bytearray()
    strings = bytearray()
    records_end = 36 * len(services)
    end = size
    for name, display, status in services:
        offsets = []
        for text in (name, display):
            encoded = utf16z(text)
            if strings_at_end:
                end -= len(encoded)
                offsets.append(end)
                strings[0:0] = encoded
            else:
                offsets.append(records_end + len(strings))
                strings += encoded
        records += b"".join(value.to_bytes(4, "little") for value in offsets + list(status))
    if strings_at_end:
        gap = size - len(records) - len(strings)
        data = bytes(records) + bytes(gap) + bytes(strings)
    else:
        data = bytes(records) + bytes(strings)
        data += bytes(size - len(data))
    assert len(data) == size
    return data


class _ReplayDce:
    """Stands in for the RPC connection: answers every request with one
    recorded reply, so that Impacket's hREnumServicesStatusW parses it."""

    def __init__(self, data):
        self.data = data

    def request(self, request, *args, **kwargs):
        return scmr.REnumServicesStatusWResponse(self.data)


def enum_services_parsed(data):
    p = scmr.REnumServicesStatusWResponse(data)
    has_resume = p.fields["lpResumeIndex"].fields["ReferentID"] != 0
    services = []
    for record in scmr.hREnumServicesStatusW(_ReplayDce(data), sc_handle()):
        entry = {"service_name": record["lpServiceName"].rstrip("\x00"),
                 "display_name": record["lpDisplayName"].rstrip("\x00")}
        entry.update({ours: record["ServiceStatus"][theirs] for ours, theirs in STATUS_FIELDS})
        services.append(entry)
    return {"buffer": blob(p["lpBuffer"]) or "", "bytes_needed": p["pcbBytesNeeded"],
            "services_returned": p["lpServicesReturned"],
            "resume_index": p["lpResumeIndex"] if has_resume else None,
            "services": services, "status": p["ErrorCode"]}


def enum_services_replies():
    """REnumServicesStatusW replies; the buffer's services are the ones
    Impacket's hREnumServicesStatusW reads from it. (Its WIDESTR ends a
    string at the first three zero bytes, so a name whose last character has
    a non-zero high byte would run into the next string: the names here end
    in characters it reads right.)"""
    samba = (
        ("Spooler", "Print Spooler", (0x110, 4, 5, 0, 0, 0, 0)),
        ("NETLOGON", "Net Logon", (0x20, 1, 0, 0, 0, 0, 0)),
        ("RemoteRegistry", "Remote Registry Service", (0x20, 4, 0, 0, 0, 0, 0)),
        ("WINS", "Windows Internet Name Service (WINS)", (0x10, 1, 0, 0x435, 0, 0, 0)),
    )
    windows = (
        ("wuauserv", "Windows Update", (0x20, 4, 0x185, 0, 0, 0, 0)),
        ("fleetpatch-7f3a", "fleetpatch agent 7f3a (Aktualisierungsdienst für Ä)", (0x10, 2, 0, 0, 0, 1, 3000)),
    )
    cases = (
        # Samba: everything fits; pcbBytesNeeded echoes the offered size and
        # the buffer is zero-filled to it.
        (enum_service_buffer(samba, 512, False), 512, 4, 0, 0),
        # Samba: too small a buffer, nothing returned, the total needed.
        (bytes(64), 388, 0, 0, 0xEA),
        # Windows-style partial answer: two services, strings at the end,
        # the bytes needed for the rest and where to resume.
        (enum_service_buffer(windows, 400, True), 1234, 2, 2, 0xEA),
        # No service at all, no resume index.
        (b"", 0, 0, None, 0),
    )
    out = []
    for buffer, needed, returned, resume, status in cases:
        r = scmr.REnumServicesStatusWResponse()
        r["lpBuffer"] = list(buffer)
        r["pcbBytesNeeded"] = needed
        r["lpServicesReturned"] = returned
        r["lpResumeIndex"] = NULL if resume is None else resume
        r["ErrorCode"] = status
        out.append(reply("REnumServicesStatusW", r, lambda p: enum_services_parsed(p.getData())))
    return out


def main():
    document = {
        "about": "generated by scripts/gen_vectors.py with Impacket; do not edit",
        "requests": requests(),
        "replies": replies(),
    }
    json.dump(document, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
