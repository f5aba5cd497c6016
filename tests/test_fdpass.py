"""QMP add-fd client (faces/fdpass) against a fake monitor, and open_device's path
checks; no root, no QEMU (integration/test_fdpass.py uses a real one)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nsmount.errors import DeviceMissingError, TargetError, UnsafePathError
from nsmount.faces import fdpass

GREETING = b'{"QMP": {"version": {}, "capabilities": ["oob"]}}\r\n'


def fake_qmp(path: str, answer: Callable[[dict[str, Any], list[int]], bytes | None],
             greeting: bytes = GREETING) -> tuple[threading.Thread, list[Any]]:
    """A one-client QMP monitor on ``path``; ``answer(cmd, fds)`` returns the raw reply."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    seen: list[Any] = []

    def run() -> None:
        conn, _ = srv.accept()
        srv.close()
        try:
            serve(conn)
        except OSError:  # the client went away (a refused peer, a test that is done)
            pass
        finally:
            conn.close()

    def serve(conn: socket.socket) -> None:
        conn.sendall(greeting)
        buf = b""
        while True:
            data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 4)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                cmd = json.loads(line)
                info = []
                for fd in fds:
                    st = os.fstat(fd)
                    info.append((st.st_dev, st.st_ino, os.get_blocking(fd)))
                    os.close(fd)
                seen.append((cmd, info))
                fds = []
                reply = answer(cmd, info)
                if reply is None:
                    return
                conn.sendall(reply)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, seen


def ok(cmd: dict[str, Any], fds: list[int]) -> bytes:
    ident = json.dumps(cmd.get("id"))
    if cmd["execute"] == "add-fd":
        return (b'{"event": "X", "data": {}}\r\n'  # events are skipped
                + f'{{"return": {{"fdset-id": 3, "fd": 21}}, "id": {ident}}}\r\n'.encode())
    return f'{{"return": {{}}, "id": {ident}}}\r\n'.encode()


def test_add_fd_sends_the_fd_with_the_command(tmp_path: Path) -> None:
    sock = str(tmp_path / "qmp.sock")
    t, seen = fake_qmp(sock, ok)
    f = tmp_path / "disk"
    f.write_bytes(b"x")
    fd = os.open(f, os.O_RDWR)
    try:
        fs = fdpass.add_fd(sock, fd, opaque="hello", expect_pid=os.getpid())
    finally:
        os.close(fd)
    t.join(5)
    assert (fs.fdset_id, fs.fd, fs.path) == (3, 21, "/dev/fdset/3")
    assert [c["execute"] for c, _ in seen] == ["qmp_capabilities", "add-fd"]
    add, fds = seen[1]
    assert add["arguments"] == {"opaque": "hello"}
    st = os.stat(f)
    assert [(d, i) for d, i, _ in fds] == [(st.st_dev, st.st_ino)]
    assert seen[0][1] == []  # no fd on any other command


def test_add_fd_refuses_another_listener(tmp_path: Path) -> None:
    sock = str(tmp_path / "qmp.sock")
    fake_qmp(sock, ok)
    with pytest.raises(TargetError, match="belongs to pid"):
        fdpass.add_fd(sock, 0, expect_pid=1)


@pytest.mark.parametrize("reply,match", [
    (b'{"error": {"class": "GenericError", "desc": "nope"}}\r\n', "GenericError: nope"),
    (b"not json\r\n", "not JSON"),
    (b"[1]\r\n", "not a JSON object"),
    (b'{"return": {"fdset-id": "x"}}\r\n', "unexpected answer"),
    (None, "closed the connection"),
])
def test_add_fd_errors(tmp_path: Path, reply: bytes | None, match: str) -> None:
    sock = str(tmp_path / "qmp.sock")

    def answer(cmd: dict[str, Any], fds: list[int]) -> bytes | None:
        return ok(cmd, fds) if cmd["execute"] == "qmp_capabilities" else reply

    fake_qmp(sock, answer)
    with pytest.raises(fdpass.QmpError, match=match):
        fdpass.add_fd(sock, 0, timeout=5)


def test_add_fd_no_greeting_and_no_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "qmp.sock")
    fake_qmp(sock, ok, greeting=b'{"hello": 1}\r\n')
    with pytest.raises(fdpass.QmpError, match="no greeting"):
        fdpass.add_fd(sock, 0, timeout=5)
    with pytest.raises(fdpass.QmpError, match="cannot connect"):
        fdpass.add_fd(str(tmp_path / "absent.sock"), 0)
    # a listener that never speaks (QEMU busy with another client): a clear timeout
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(tmp_path / "silent.sock"))
    silent.listen(1)
    try:
        with pytest.raises(fdpass.QmpError, match="one client per QMP socket"):
            fdpass.add_fd(str(tmp_path / "silent.sock"), 0, timeout=0.3)
    finally:
        silent.close()


@pytest.mark.parametrize("path,err", [
    ("/etc/passwd", UnsafePathError),
    ("/dev/../etc/passwd", UnsafePathError),
    ("dev/null", UnsafePathError),
    ("/dev/nonexistent-nsmount-test", DeviceMissingError),
    ("/dev", UnsafePathError),
])
def test_open_device_refuses(path: str, err: type[Exception]) -> None:
    with pytest.raises(err):
        fdpass.open_device(path)


def test_open_device_opens_the_verified_node() -> None:
    seen = []
    with fdpass.open_device("/dev/null", check=lambda p, n: seen.append((p, n.path))) as d:
        assert d.fd >= 0 and os.get_blocking(d.fd)
        assert os.fstat(d.fd).st_rdev == os.stat("/dev/null").st_rdev
        assert os.write(d.fd, b"x") == 1
        assert d.to_dict()["kind"] == "chr"
    assert d.fd == -1 and seen == [("/dev/null", "/dev/null")]

    def refuse(path: str, node: object) -> None:
        raise TargetError("policy says no")

    with pytest.raises(TargetError, match="policy says no"):
        fdpass.open_device("/dev/null", check=refuse)
    with fdpass.open_device("/dev/zero", write=False) as d:
        assert os.read(d.fd, 2) == b"\0\0"
        with pytest.raises(OSError):
            os.write(d.fd, b"x")
