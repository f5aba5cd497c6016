"""A tiny synchronous QMP client for the integration tests (stdlib only).

    from qmp import QMP
    with QMP.connect("/tmp/qmp.sock", timeout=20) as q:
        q.cmd("query-status")                      # -> {"status": "prelaunch", ...}
        r = q.execute("blockdev-add", {...})       # -> {"return": ...} or {"error": ...}

``connect`` retries until the socket accepts (QEMU may still be starting), reads the
greeting and negotiates capabilities.  Asynchronous events are collected in ``events``.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any


class QMPError(Exception):
    """QEMU answered with an ``error`` object."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class QMP:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise ConnectionError(f"not a QMP greeting: {self.greeting!r}")
        self.cmd("qmp_capabilities")

    @classmethod
    def connect(cls, path: str, *, timeout: float = 20.0) -> QMP:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            try:
                s.connect(path)
                return cls(s)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            except BaseException:
                s.close()
                raise

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        return json.loads(line)  # type: ignore[no-any-return]

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command; return the raw reply (``return`` or ``error``)."""
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply

    def cmd(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Like :meth:`execute` but returns ``return`` and raises :class:`QMPError`."""
        reply = self.execute(command, arguments)
        if "error" in reply:
            raise QMPError(command, reply["error"])
        return reply.get("return")

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
