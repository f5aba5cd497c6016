"""Ask the service for a device fd: the unprivileged side of ``open-device``.

    >>> from nsmount.faces.fdclient import obtain_device
    >>> dev = obtain_device("/dev/loop3", pid=qemu_pid)     # DeviceFd, fd from the service
    >>> fdpass.add_fd(qmp_socket, dev.fd, expect_pid=qemu_pid); dev.close()

The request carries the pidfd of the QEMU the caller acts for (``SCM_RIGHTS``); the
answer carries the open device fd the same way, never a path to open.  What arrives
is checked before it is returned: exactly one fd, the kind and device number the
answer names, opened with the asked access mode.  Every read is ``recvmsg`` with
``MSG_CMSG_CLOEXEC``; fds nobody asked for are closed.  Standard library only (a
rootless user's ``nsmount`` runs under the system Python).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import time
from typing import Any

from ..errors import DeniedError, NoSuchProcessError, NsmountError
from ..kernel.scm import fds_from_ancdata
from ..model.devnode import KIND_BITS, Entry
from ..model.display import safe_line
from ..model.paths import canonical
from ..state.record import DEFAULT_STATE_DIR
from .fdpass import DeviceFd

SOCKET_NAME = "nsmount.sock"
MAX_ANSWER = 1 << 20
#: fds one answer read may carry; more (a confused service) are closed
_ANC = socket.CMSG_SPACE(4 * 4)


class ServiceUnavailableError(NsmountError):
    """No service answers on the socket (absent, refused, or not allowed to connect)."""


def service_socket() -> str:
    """``$NSMOUNT_SOCKET``, else ``$NSMOUNT_STATE_DIR/nsmount.sock``, else the service's
    default ``/run/nsmount/nsmount.sock`` -- for every user (a rootless user's own state
    dir is not where the service listens)."""
    return os.environ.get("NSMOUNT_SOCKET") or os.path.join(
        os.environ.get("NSMOUNT_STATE_DIR") or DEFAULT_STATE_DIR, SOCKET_NAME)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def request_fd(sock: socket.socket, obj: dict[str, Any], pidfd: int, deadline: float
               ) -> tuple[dict[str, Any], list[int]]:
    """Send one request line with ``pidfd`` attached to its first byte; return the
    answer object and the fds that came with it (the caller owns them)."""
    line = (json.dumps({"v": 1, **obj}, separators=(",", ":")) + "\n").encode()
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    sent = socket.send_fds(sock, [line], [pidfd])
    if sent < len(line):
        sock.sendall(line[sent:])
    buf = bytearray()
    fds: list[int] = []
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            data, anc, _flags, _ = sock.recvmsg(1 << 16, _ANC, socket.MSG_CMSG_CLOEXEC)
            fds += fds_from_ancdata(anc)
            if not data:
                break
            buf += data
            if len(buf) > MAX_ANSWER:
                raise NsmountError("the nsmount service sent an over-long answer")
        if b"\n" not in buf:
            raise ServiceUnavailableError("the nsmount service closed the connection "
                                          "without answering")
        ans = json.loads(bytes(buf[:buf.index(b"\n")]))
        if not isinstance(ans, dict):
            raise ValueError
    except ValueError:
        _close(fds)
        raise NsmountError("malformed answer from the nsmount service") from None
    except BaseException:
        _close(fds)
        raise
    return ans, fds


def connect(path: str, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        raise ServiceUnavailableError(f"no nsmount service at {path} "
                                      f"({exc.strerror or exc})") from None
    return s


def raise_refusal(ans: dict[str, Any], what: str) -> None:
    """The service's error answer as an NsmountError: ``denied``/``bad-pidfd``/
    ``unauthorized`` are DeniedError (exit 17), the rest exit 2.  ``what``: e.g.
    ``open /dev/vda``."""
    raw = ans.get("error")
    err: dict[str, Any] = raw if isinstance(raw, dict) else {}
    code, msg = str(err.get("code", "error")), safe_line(str(err.get("message", ""))[:1000])
    if code in ("denied", "bad-pidfd", "unauthorized"):
        raise DeniedError(f"the nsmount service refused to {what}: {msg}")
    raise NsmountError(f"the nsmount service could not {what}: {code}: {msg}")


def _pidfd_request(op: str, path: str, *, pid: int, write: bool, timeout: float,
                   wait: float, socket_path: str | None, sock: socket.socket | None = None
                   ) -> tuple[dict[str, Any], list[int]]:
    """One fd op for the caller's VM ``pid``: its pidfd attached, the answer and the fds
    that came with it within ``wait`` seconds (``timeout``: what the service is asked
    to take).  ``sock``: an open connection to reuse, else one is made and closed."""
    deadline = time.monotonic() + wait
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise NoSuchProcessError(f"pid {pid} does not exist") from None
    try:
        s = sock if sock is not None else connect(socket_path or service_socket(), wait)
        try:
            return request_fd(s, {"op": op, "path": path, "write": write,
                                  "timeout": min(timeout, 300.0)}, pidfd, deadline)
        except TimeoutError:
            raise NsmountError(f"no answer from the nsmount service within {timeout:g}s") \
                from None
        except (BrokenPipeError, ConnectionResetError):
            raise ServiceUnavailableError("the nsmount service closed the connection") \
                from None
        finally:
            if sock is None:
                s.close()
    finally:
        os.close(pidfd)


def obtain_device(path: str, *, pid: int, write: bool = True, socket_path: str | None = None,
                  timeout: float = 10.0, sock: socket.socket | None = None) -> DeviceFd:
    """The device ``path`` opened by the service for the caller's VM ``pid``
    (read-write, or read-only): a :class:`~nsmount.faces.fdpass.DeviceFd` whose fd the
    caller owns.  ``sock``: an open connection to reuse (many requests, one
    connection), else one is made to ``socket_path`` (:func:`service_socket`).

    DeniedError (exit 17) when the policy or the pidfd check refuses,
    ServiceUnavailableError when no service answers, NoSuchProcessError when ``pid``
    is gone."""
    path = canonical(path, what="device path")
    ans, fds = _pidfd_request("open-device", path, pid=pid, write=write, timeout=timeout,
                              wait=timeout, socket_path=socket_path, sock=sock)
    if not ans.get("ok"):
        _close(fds)
        raise_refusal(ans, f"open {path}")
    try:
        return _checked(ans.get("result"), fds, write)
    except BaseException:
        _close(fds)
        raise


def _checked(res: Any, fds: list[int], write: bool) -> DeviceFd:
    """The answer's fd, checked against what the answer says it is."""
    if len(fds) != 1 or not isinstance(res, dict):
        raise NsmountError(f"the nsmount service answered with {len(fds)} fds, not one")
    fd = fds[0]
    try:
        kind = str(res["kind"])
        entry = Entry(str(res["node"]), kind, int(res["major"]), int(res["minor"]))
        st = os.fstat(fd)
        if kind not in ("chr", "blk") or stat.S_IFMT(st.st_mode) != KIND_BITS[kind] \
                or st.st_rdev != entry.rdev:
            raise NsmountError("the fd from the nsmount service is not the device its "
                               "answer names")
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if mode != (os.O_RDWR if write else os.O_RDONLY):
            raise NsmountError("the fd from the nsmount service has the wrong access mode")
        return DeviceFd(fd, str(res["path"]), entry, write)
    except (KeyError, TypeError, ValueError):
        raise NsmountError("malformed answer from the nsmount service") from None


def bind_device(path: str, *, pid: int, write: bool = True, socket_path: str | None = None,
                timeout: float = 30.0) -> dict[str, Any]:
    """Ask the service to bind the host node ``path`` into the caller's rootless VM
    ``pid`` (``device-bind``; read-only when ``write`` is false or the policy grants
    only that).  Returns the service's result (``path``, ``node``, ``read_only``,
    ``status`` ``bound`` or ``present``).  DeniedError (exit 17) when refused."""
    path = canonical(path, what="device path")
    # the service's job has ``timeout``; its answer may come a little after that
    ans, fds = _pidfd_request("device-bind", path, pid=pid, write=write, timeout=timeout,
                              wait=timeout + 10.0, socket_path=socket_path)
    _close(fds)  # this answer carries none; whatever came is not kept
    if not ans.get("ok"):
        raise_refusal(ans, f"bind {path}")
    res = ans.get("result")
    if not isinstance(res, dict):
        raise NsmountError("malformed answer from the nsmount service")
    return res
