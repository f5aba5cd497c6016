"""The service's socket protocol, version 1: one JSON object per line each way.

Requests are parsed here and nowhere else; every field is validated, the line size is
capped, unknown keys are refused.  See ``docs/protocol.rst``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ...errors import SpecError
from ...model.paths import canonical, is_strictly_within

VERSION = 1
#: one request line (a domain XML rides along with ``started``/``reconnect``)
MAX_REQUEST = 4 << 20
MAX_TIMEOUT = 300.0
DEFAULT_TIMEOUT = 30.0
MAX_PATHS = 64
MAX_NAME = 256
MAX_PID = 1 << 22  # pid_max's ceiling

OPS = ("list", "status", "reconnect", "started", "repair", "device-add", "device-remove",
       "open-device", "device-bind")
#: ops any local user may send (the device policy decides); each needs the pidfd of the
#: VM it acts for attached with SCM_RIGHTS.  Every other op: root or the socket group.
FD_OPS = ("open-device", "device-bind")
#: fds a request may carry (the pidfd); more are refused
MAX_REQUEST_FDS = 1
_KEYS = {"v", "op", "id", "timeout", "domain", "pid", "xml", "paths", "path", "write"}

# error codes
BAD_REQUEST = "bad-request"
TOO_LARGE = "too-large"
UNAUTHORIZED = "unauthorized"
DENIED = "denied"          # the device policy refused
BAD_PIDFD = "bad-pidfd"    # no pidfd, not a pidfd, exited, or another user's process
BAD_VERSION = "unsupported-version"
UNKNOWN_OP = "unknown-op"
BUSY = "busy"
TIMEOUT = "timeout"
FAILED = "failed"


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, req_id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id


@dataclass(frozen=True)
class Request:
    op: str
    id: str | int | None = None
    timeout: float = DEFAULT_TIMEOUT
    domain: str | None = None
    pid: int | None = None
    xml: str | None = None
    paths: tuple[str, ...] = field(default=())
    path: str | None = None  # open-device, device-bind
    write: bool = True

    @property
    def target(self) -> str:
        """What ``repair``/``device-*`` act on: ``pid:N`` or the domain name."""
        return f"pid:{self.pid}" if self.pid is not None else str(self.domain)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_domain(name: object) -> str:
    """A libvirt domain name: a file name in libvirt's state dir, nothing more."""
    if not isinstance(name, str) or not name:
        raise ProtocolError(BAD_REQUEST, "'domain' must be a non-empty string")
    if len(name) > MAX_NAME:
        raise ProtocolError(BAD_REQUEST, f"'domain' is longer than {MAX_NAME} characters")
    if "/" in name or "\0" in name or name in (".", "..") or not name.isprintable():
        raise ProtocolError(BAD_REQUEST, "'domain' must be a plain name (no '/', no control "
                            "characters)")
    return name


def parse_request(line: bytes) -> Request:
    """One request line (without its newline) -> Request, or ProtocolError."""
    if len(line) > MAX_REQUEST:
        raise ProtocolError(TOO_LARGE, f"request larger than {MAX_REQUEST} bytes")
    try:
        data: Any = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError(BAD_REQUEST, "request is not UTF-8") from None
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(BAD_REQUEST, "request must be a JSON object")
    rid = data.get("id")
    if rid is not None and not ((_is_int(rid) and abs(rid) < 2 ** 53)
                                or (isinstance(rid, str) and len(rid) <= 128)):
        raise ProtocolError(BAD_REQUEST, "'id' must be an integer or a string of at most 128 "
                            "characters")
    ver = data.get("v")
    if ver != VERSION:
        raise ProtocolError(BAD_VERSION, f"protocol version {ver!r} not supported (this "
                            f"service speaks {VERSION}); send \"v\": {VERSION}", rid)
    unknown = sorted(str(k)[:40] for k in set(data) - _KEYS)
    if unknown:
        raise ProtocolError(BAD_REQUEST, f"unknown key(s): {', '.join(unknown)}", rid)
    op = data.get("op")
    if op not in OPS:
        shown = op[:40] if isinstance(op, str) else type(op).__name__
        raise ProtocolError(UNKNOWN_OP, f"unknown op {shown!r}; expected one of "
                            f"{', '.join(OPS)}", rid)
    try:
        return _fields(op, data, rid)
    except ProtocolError as exc:
        exc.req_id = rid
        raise


def _fields(op: str, data: dict[str, Any], rid: str | int | None) -> Request:
    timeout = data.get("timeout", DEFAULT_TIMEOUT)
    if not (_is_int(timeout) or isinstance(timeout, float)) or not math.isfinite(timeout) \
            or not 0 < timeout <= MAX_TIMEOUT:
        raise ProtocolError(BAD_REQUEST, f"'timeout' must be a number of seconds in "
                            f"(0, {MAX_TIMEOUT:g}]")
    domain = data.get("domain")
    pid = data.get("pid")
    xml = data.get("xml")
    paths = data.get("paths")
    if domain is not None:
        domain = check_domain(domain)
    if pid is not None and not (_is_int(pid) and 0 < pid < MAX_PID):
        raise ProtocolError(BAD_REQUEST, f"'pid' must be an integer in (0, {MAX_PID})")
    if xml is not None and not isinstance(xml, str):
        raise ProtocolError(BAD_REQUEST, "'xml' must be a string")
    allowed: set[str] = set()
    path = data.get("path")
    write = data.get("write", True)
    if op in FD_OPS:
        if path is None:
            raise ProtocolError(BAD_REQUEST, f"{op} needs 'path'")
        path = _paths([path])[0]
        if not isinstance(write, bool):
            raise ProtocolError(BAD_REQUEST, "'write' must be true or false")
        allowed = {"path", "write"}
    elif op in ("reconnect", "started"):
        if domain is None:
            raise ProtocolError(BAD_REQUEST, f"{op} needs 'domain'")
        allowed = {"domain", "xml"}
    elif op in ("repair", "device-add", "device-remove"):
        if (pid is None) == (domain is None):
            raise ProtocolError(BAD_REQUEST, f"{op} needs exactly one of 'pid' and 'domain'")
        allowed = {"domain", "pid"}
        if op != "repair":
            allowed.add("paths")
            paths = _paths(paths)
    extra = sorted(k for k in ("domain", "pid", "xml", "paths", "path", "write")
                   if data.get(k) is not None and k not in allowed)
    if extra:
        raise ProtocolError(BAD_REQUEST, f"{op} takes no {', '.join(extra)}")
    return Request(op, rid, float(timeout), domain, pid, xml, tuple(paths or ()),
                   path if op in FD_OPS else None, bool(write))


def _paths(paths: object) -> list[str]:
    if not isinstance(paths, list) or not paths or len(paths) > MAX_PATHS:
        raise ProtocolError(BAD_REQUEST, f"'paths' must be a list of 1 to {MAX_PATHS} paths")
    out = []
    for p in paths:
        if not isinstance(p, str) or len(p) > 4096:
            raise ProtocolError(BAD_REQUEST, "each path must be a string (at most 4096 chars)")
        try:
            c = canonical(p, what="device path")
        except SpecError as exc:
            raise ProtocolError(BAD_REQUEST, exc.oneline()) from None
        if not is_strictly_within(c, "/dev"):
            raise ProtocolError(BAD_REQUEST, f"{c!r} is not under /dev")
        out.append(c)
    return out


def ok(req_id: str | int | None, result: Any) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "ok": True, "result": result}


def error(req_id: str | int | None, code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "id": req_id, "ok": False,
            "error": {"code": code, "message": message}}


def encode(obj: Any) -> bytes:
    """One response line (ASCII JSON: lone surrogates from VM names survive as \\udcXX)."""
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode("ascii")
