"""Hand a device to a running QEMU as an open file descriptor: QMP ``add-fd``.

    >>> from nsmount.faces import fdpass
    >>> dev = fdpass.open_device("/dev/loop3")                 # verified, opened
    >>> fs = fdpass.add_fd("/run/vm1/qmp.sock", dev.fd, expect_pid=qemu_pid)
    >>> fs.path                                                # '/dev/fdset/0'
    >>> dev.close()                                            # QEMU holds its own copy

QEMU then opens ``/dev/fdset/N`` (``blockdev-add`` with ``"filename": "/dev/fdset/N"``)
by duplicating the fd whose access mode matches: the node never has to exist in its
``/dev``, and a QEMU without privileges (a rootless VM) gets a device its user could
not open.  The established pattern (libvirt, qemu-pr-helper, qemu-bridge-helper): a
privileged party opens, QEMU receives the fd with ``SCM_RIGHTS``.

:func:`open_device` is the one place a device is opened for someone else.  It takes
a ``check`` callback (called with the resolved node before anything is opened) so the
resident service can apply its policy and pass the fd over its own socket; nothing in
it prints, logs or depends on the command line.  Standard library only.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.hostfacts import resolve
from ..errors import (DeviceMissingError, NsmountError, PrivilegeError, TargetError,
                      UnsafePathError)
from ..kernel import consts as C
from ..kernel import fsops, syscalls
from ..model.devnode import Entry
from ..model.paths import canonical, is_strictly_within

#: longest QMP line nsmount reads (QEMU's answers here are tiny)
MAX_LINE = 1 << 20


class QmpError(NsmountError):
    """The QMP monitor refused, answered nonsense, or could not be reached."""

    exit_code = 2


# --------------------------------------------------------------------- opening
@dataclass
class DeviceFd:
    """An open device: ``fd`` (close-on-exec), what was asked and what it resolved to."""

    fd: int
    path: str      # as asked (canonical), e.g. /dev/disk/by-id/X
    node: Entry    # the device node it resolved to on the host (/dev/sdb)
    writable: bool

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DeviceFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "node": self.node.path, "kind": self.node.kind,
                "major": self.node.major, "minor": self.node.minor,
                "read_only": not self.writable}


def resolve_device(path: str) -> tuple[str, Entry]:
    """(canonical path, the host device node it names): a path under /dev, no '..',
    symlink chains followed only while they stay under /dev, and the end a character
    or block device.  UnsafePathError / DeviceMissingError otherwise."""
    path = canonical(path, what="device path")
    if not is_strictly_within(path, "/dev"):
        raise UnsafePathError(f"{path} is not under /dev")
    try:
        entries = resolve(path)
    except FileNotFoundError:
        raise DeviceMissingError(f"{path} does not exist on the host") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{path}: symlink loop") from None
        raise DeviceMissingError(f"{path}: {exc.strerror}") from None
    return path, entries[-1]


def open_device(path: str, *, write: bool = True,
                check: Callable[[str, Entry], None] | None = None) -> DeviceFd:
    """Open the device node ``path`` names, for reading and writing (or read-only).

    The node is resolved on the host (:func:`resolve_device`), ``check(path, node)``
    may refuse it by raising (the service's policy), then it is looked up again with
    the one safe resolver (``openat2``, no symlinks) as an ``O_PATH`` handle, verified
    to be that very node (type and rdev), and only then opened -- by reopening that
    handle through the host's procfs, so what is opened is what was verified.  The
    open uses ``O_NOCTTY`` and ``O_NONBLOCK`` (a tty or tape never blocks nsmount;
    the flag is cleared afterwards).  The caller's own rights apply: root opens
    anything, another user what it may open.
    """
    path, node = resolve_device(path)
    if check is not None:
        check(path, node)
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            handle = fsops.open_path(root, node.path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceMissingError(f"{node.path}: {exc.strerror}") from None
    finally:
        os.close(root)
    try:
        st = os.fstat(handle)
        if stat.S_IFMT(st.st_mode) != node.type_bits or st.st_rdev != node.rdev:
            raise UnsafePathError(f"{node.path} changed while it was being opened")
        flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY \
            | os.O_NONBLOCK
        try:
            if fsops.HOST_PROC >= 0:
                fd = os.open(f"thread-self/fd/{handle}", flags, dir_fd=fsops.HOST_PROC)
            else:  # no procfs: the safe resolver once more, then compare
                fd = syscalls.openat2(C.AT_FDCWD, node.path, flags, fsops.SAFE_RESOLVE)
        except PermissionError:
            raise PrivilegeError(f"cannot open {node.path} "
                                 f"{'read-write' if write else 'read-only'}: "
                                 "permission denied") from None
        except OSError as exc:
            raise DeviceMissingError(f"cannot open {node.path}: {exc.strerror}") from None
        got = os.fstat(fd)
        if (got.st_dev, got.st_ino, got.st_rdev) != (st.st_dev, st.st_ino, st.st_rdev):
            os.close(fd)
            raise UnsafePathError(f"{node.path} changed while it was being opened")
        os.set_blocking(fd, True)
        return DeviceFd(fd, path, node, write)
    finally:
        os.close(handle)


# ------------------------------------------------------------------------ QMP
@dataclass(frozen=True)
class FdSet:
    """Where QEMU keeps the fd: ``/dev/fdset/<fdset_id>`` in ``blockdev-add``."""

    fdset_id: int
    fd: int  # the fd number inside QEMU

    @property
    def path(self) -> str:
        return f"/dev/fdset/{self.fdset_id}"

    def to_dict(self) -> dict[str, Any]:
        return {"fdset_id": self.fdset_id, "fd": self.fd, "fdset": self.path}


class _Qmp:
    """Just enough QMP: greeting, capabilities, one command with an fd attached."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = b""
        self.seq = 0

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise QmpError(self._late())
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise QmpError(self._late()) from None
            if not chunk:
                raise QmpError("QMP monitor closed the connection")
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise QmpError("QMP monitor sent an over-long line")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError("QMP monitor sent something that is not JSON") from None
        if not isinstance(msg, dict):
            raise QmpError("QMP monitor sent something that is not a JSON object")
        return msg

    def _late(self) -> str:
        if self.seq == 0:  # not even a greeting: QEMU serves one client per QMP socket
            return ("QMP monitor did not greet in time (QEMU serves one client per QMP "
                    "socket: is another client connected? give QEMU a second -qmp socket)")
        return "QMP monitor did not answer in time"

    def greet(self) -> None:
        if "QMP" not in self._line():
            raise QmpError("not a QMP monitor (no greeting)")
        self.call("qmp_capabilities")

    def call(self, command: str, arguments: dict[str, Any] | None = None,
             fds: list[int] | None = None) -> Any:
        self.seq += 1
        ident = f"nsmount-{os.getpid()}-{self.seq}"
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        self.sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        try:
            if fds:  # the fd travels with the bytes of the command that uses it
                sent = socket.send_fds(self.sock, [data], fds)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except TimeoutError:
            raise QmpError("QMP monitor did not take the command in time") from None
        while True:
            reply = self._line()
            if "event" in reply:
                continue
            if reply.get("id") not in (ident, None):
                continue
            if "error" in reply:
                err = reply["error"] if isinstance(reply["error"], dict) else {}
                raise QmpError(f"QMP {command}: {err.get('class', 'Error')}: "
                               f"{str(err.get('desc', reply['error']))[:300]}")
            if "return" not in reply:
                raise QmpError(f"QMP {command}: unexpected answer")
            return reply["return"]


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process that listens on the other end (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", raw)
    return int(pid)


def add_fd(qmp_socket: str, fd: int, *, fdset_id: int | None = None,
           opaque: str | None = None, expect_pid: int | None = None,
           timeout: float = 10.0) -> FdSet:
    """Give ``fd`` to the QEMU listening on the QMP unix socket ``qmp_socket`` with
    ``add-fd`` (``SCM_RIGHTS``), after the greeting and ``qmp_capabilities``.

    ``expect_pid``: refuse (TargetError) unless the process on the other end of the
    socket is that pid (``SO_PEERCRED``), so an fd never goes to whatever else listens
    on a path.  Returns the fd set; ``add_fd(...).path`` is ``/dev/fdset/N``.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(qmp_socket)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise QmpError(f"cannot connect to the QMP socket {qmp_socket}: "
                           f"{exc.strerror}") from None
        except PermissionError:
            raise PrivilegeError(f"cannot connect to the QMP socket {qmp_socket}: "
                                 "permission denied") from None
        except OSError as exc:
            raise QmpError(f"cannot connect to the QMP socket {qmp_socket}: "
                           f"{exc.strerror or exc}") from None
        if expect_pid is not None:
            got = peer_pid(sock)
            if got != expect_pid:
                raise TargetError(f"the QMP socket {qmp_socket} belongs to pid {got}, not "
                                  f"to the target pid {expect_pid}; refusing to pass an fd")
        q = _Qmp(sock, deadline)
        q.greet()
        args: dict[str, Any] = {}
        if fdset_id is not None:
            args["fdset-id"] = fdset_id
        if opaque is not None:
            args["opaque"] = opaque
        ret = q.call("add-fd", args, fds=[fd])
        try:
            return FdSet(int(ret["fdset-id"]), int(ret["fd"]))
        except (KeyError, TypeError, ValueError):
            raise QmpError("QMP add-fd: unexpected answer") from None
    finally:
        sock.close()


def pass_device(qmp_socket: str, path: str, *, write: bool = True,
                expect_pid: int | None = None, timeout: float = 10.0,
                check: Callable[[str, Entry], None] | None = None,
                opener: Callable[[str, bool], DeviceFd] | None = None
                ) -> tuple[DeviceFd, FdSet]:
    """open_device (or ``opener(path, write)``: e.g. the service's
    :func:`nsmount.faces.fdclient.obtain_device` for a user's launcher) + add_fd;
    nsmount's own copy of the fd is closed before returning (``DeviceFd.fd`` is -1
    then: QEMU holds the only one)."""
    dev = opener(path, write) if opener is not None else \
        open_device(path, write=write, check=check)
    try:
        fs = add_fd(qmp_socket, dev.fd, expect_pid=expect_pid, timeout=timeout,
                    opaque=f"nsmount:{dev.node.path}")
    finally:
        dev.close()
    return dev, fs
