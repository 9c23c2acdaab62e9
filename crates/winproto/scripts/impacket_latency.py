#!/usr/bin/python3
"""Per-operation latency of Impacket (the reference client) against an SMB
server: N times create + write 4 KiB + close on a share, over one session.

    /usr/bin/python3 scripts/impacket_latency.py HOST PORT USER PASSWORD SHARE N

Prints one line: `impacket_op_ms <median> <mean>`.
"""
import statistics
import sys
import time

from impacket.smbconnection import SMBConnection
from impacket.smb3structs import FILE_WRITE_DATA, FILE_OVERWRITE_IF, FILE_NON_DIRECTORY_FILE


def main():
    host, port, user, password, share, count = sys.argv[1:7]
    connection = SMBConnection(host, host, sess_port=int(port))
    connection.login(user, password)
    tree = connection.connectTree(share)
    payload = b"x" * 4096
    samples = []
    for index in range(int(count) + 5):
        started = time.perf_counter()
        fid = connection.createFile(tree, "impacket-latency-%d.bin" % (index % 8),
                                    desiredAccess=FILE_WRITE_DATA,
                                    creationDisposition=FILE_OVERWRITE_IF,
                                    creationOption=FILE_NON_DIRECTORY_FILE)
        connection.writeFile(tree, fid, payload, 0)
        connection.closeFile(tree, fid)
        if index >= 5:
            samples.append((time.perf_counter() - started) * 1000.0)
    connection.logoff()
    print("impacket_op_ms %.3f %.3f" % (statistics.median(samples), statistics.mean(samples)))


if __name__ == "__main__":
    main()
