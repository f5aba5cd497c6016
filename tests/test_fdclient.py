"""The client of ``open-device`` against a service that lies (no root needed): what
arrives is checked, and every fd that is not returned is closed."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable

import pytest

from nsmount.errors import DeniedError, NsmountError
from nsmount.faces.fdclient import obtain_device


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fake_service(answer: Callable[[dict[str, object], int], tuple[bytes, list[int]]]
                 ) -> tuple[socket.socket, threading.Thread]:
    """A socketpair whose far end reads one request (checking the pidfd came with it)
    and sends ``answer(request, pidfd)``."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def serve() -> None:
        with theirs:
            msg, fds, _flags, _ = socket.recv_fds(theirs, 1 << 16, 4)
            req = json.loads(msg)
            data, send = answer(req, len(fds))
            for fd in fds:
                os.close(fd)
            socket.send_fds(theirs, [data], send) if send else theirs.sendall(data)
            for fd in send:
                os.close(fd)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return ours, t


def result(**kw: object) -> bytes:
    return json.dumps({"v": 1, "id": None, "ok": True, "result": {
        "path": "/dev/null", "node": "/dev/null", "kind": "chr", "major": 1, "minor": 3,
        "read_only": False, **kw}}).encode() + b"\n"


def test_good_answer() -> None:
    before = fd_count()
    seen: list[object] = []

    def answer(req: dict[str, object], nfds: int) -> tuple[bytes, list[int]]:
        seen.append((req["op"], req["path"], req["write"], nfds))
        return result(), [os.open("/dev/null", os.O_RDWR)]

    s, t = fake_service(answer)
    with s:
        dev = obtain_device("/dev//null", pid=os.getpid(), sock=s)
    t.join()
    assert seen == [("open-device", "/dev/null", True, 1)]
    assert (dev.node.kind, dev.node.major, dev.node.minor, dev.writable) == ("chr", 1, 3, True)
    os.write(dev.fd, b"x")
    dev.close()
    assert fd_count() == before


@pytest.mark.parametrize("case", ["wrong-rdev", "two-fds", "no-fd", "wrong-mode",
                                  "garbage", "denied", "bad-pidfd", "failed"])
def test_lying_or_refusing_service(case: str) -> None:
    before = fd_count()

    def answer(req: dict[str, object], nfds: int) -> tuple[bytes, list[int]]:
        null = os.open("/dev/null", os.O_RDWR)
        if case == "wrong-rdev":
            return result(kind="blk", major=7, minor=0), [null]
        if case == "two-fds":
            return result(), [null, os.open("/dev/null", os.O_RDWR)]
        if case == "no-fd":
            os.close(null)
            return result(), []
        if case == "wrong-mode":
            os.close(null)
            return result(), [os.open("/dev/null", os.O_RDONLY)]
        if case == "garbage":
            return b"{nope\n", [null]
        code = case
        return json.dumps({"v": 1, "ok": False, "error": {
            "code": code, "message": "the policy /etc/p.toml grants uid 1 nothing"}}
        ).encode() + b"\n", [null]

    s, t = fake_service(answer)
    with s, pytest.raises(NsmountError) as ei:
        obtain_device("/dev/null", pid=os.getpid(), sock=s)
    t.join()
    if case in ("denied", "bad-pidfd"):
        assert isinstance(ei.value, DeniedError) and ei.value.exit_code == 17
        assert "/etc/p.toml" in str(ei.value)
    else:
        assert not isinstance(ei.value, DeniedError), ei.value
    assert fd_count() == before  # whatever came with the answer was closed
