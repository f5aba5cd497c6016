"""File descriptors carried by a Unix socket message (``SCM_RIGHTS``)."""

from __future__ import annotations

import array
import socket


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Every fd in ``recvmsg``'s ancillary data.  The caller owns them all: it must
    close each one it does not keep, whatever else the message holds."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds
