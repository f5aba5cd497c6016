"""Client side of the service socket: one request, one answer, under a deadline.

Used by ``nsmount list`` and by ``nsmount libvirt-hook`` (which falls back to the
in-process repair when no service answers).  Shell scripts can talk to the service
without Python: see ``docs/protocol.rst``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any

from ...errors import NsmountError
from ...state.record import state_dir
from .protocol import MAX_REQUEST, VERSION

SOCKET_NAME = "nsmount.sock"
#: an answer (``list`` of many VMs) may be big, but never unbounded
MAX_RESPONSE = 64 << 20


class ServiceUnavailable(NsmountError):
    """No service answers on the socket (absent, refused, or not allowed to connect)."""


class ServiceError(NsmountError):
    """The service answered with an error (``code`` says which)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"service: {code}: {message}")
        self.code = code


def socket_path(sdir: str | None = None) -> str:
    return os.path.join(state_dir(sdir), SOCKET_NAME)


def request(obj: dict[str, Any], timeout: float, *, path: str | None = None,
            sdir: str | None = None) -> dict[str, Any]:
    """Send one request (``v`` is filled in) and return the answer object (``ok`` true
    or false).  ServiceUnavailable when nothing listens (or the socket refuses us);
    NsmountError when the answer does not come within ``timeout`` seconds."""
    path = path or socket_path(sdir)
    obj = {"v": VERSION, **obj}
    line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    if len(line) > MAX_REQUEST:
        raise NsmountError(f"request larger than {MAX_REQUEST} bytes")
    deadline = time.monotonic() + timeout
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise ServiceUnavailable(f"no nsmount service at {path} ({exc.strerror})") from None
        except PermissionError:
            raise ServiceUnavailable(f"not allowed to connect to {path} (root only, or the "
                                     "configured socket group)") from None
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EACCES):
                raise ServiceUnavailable(f"no nsmount service at {path}") from None
            raise
        s.sendall(line)
        buf = bytearray()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            s.settimeout(left)
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_RESPONSE:
                raise NsmountError("service answer too large")
    except TimeoutError:
        raise NsmountError(f"no answer from the nsmount service within {timeout:g}s") from None
    except (ConnectionResetError, BrokenPipeError):
        raise ServiceUnavailable("the nsmount service closed the connection") from None
    finally:
        s.close()
    if b"\n" not in buf:
        raise ServiceUnavailable("the nsmount service closed the connection without answering")
    try:
        ans = json.loads(bytes(buf[:buf.index(b"\n")]))
    except ValueError:
        raise NsmountError("malformed answer from the nsmount service") from None
    if not isinstance(ans, dict):
        raise NsmountError("malformed answer from the nsmount service")
    return ans


def call(obj: dict[str, Any], timeout: float, **kw: Any) -> Any:
    """:func:`request`, returning ``result`` or raising ServiceError."""
    ans = request(obj, timeout, **kw)
    if not ans.get("ok"):
        err = ans.get("error") or {}
        raise ServiceError(str(err.get("code", "error")), str(err.get("message", "")))
    return ans.get("result")


def hook_request(domain: str, op: str, xml: str | None, *, timeout: float = 60.0,
                 sdir: str | None = None) -> list[str] | None:
    """The libvirt hook's request (``reconnect``/``started``) to the service: the lines
    to log, or None when no service answers (the hook then repairs in-process)."""
    obj: dict[str, Any] = {"op": op, "domain": domain, "timeout": min(timeout, 300.0),
                           "id": "libvirt-hook-py"}
    if xml and xml.strip():
        obj["xml"] = xml
    try:
        ans = request(obj, timeout + 10.0, sdir=sdir)
    except ServiceUnavailable:
        return None
    if not ans.get("ok"):
        err = ans.get("error") or {}
        return [f"service: {err.get('code', 'error')}: {err.get('message', '')}"]
    res = ans.get("result") or {}
    lines = []
    for o in res.get("vms", []) if isinstance(res, dict) else []:
        msg = o.get("error") if o.get("status") == "failed" else \
            f"{len(o.get('actions', []))} action(s)"
        lines.append(f"{o.get('status')}: {msg} (via the service)")
    return lines
