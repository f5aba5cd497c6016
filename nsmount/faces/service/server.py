"""The local socket: ``$STATE/nsmount.sock``, line-delimited JSON (:mod:`.protocol`).

Root-only by default (0600); with a configured group 0660 ``root:GROUP``.  Every
connection's peer credentials (``SO_PEERCRED``) are checked again: only root or a
member of the socket group is served, whatever the file mode says.  Bounded: line
size, requests in flight per connection, connections, idle time.  A bad request gets
an error answer; nothing a client sends stops the service.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from .loop import IN, OUT, Reactor, Timer
from .protocol import (
    BAD_REQUEST,
    BUSY,
    MAX_REQUEST,
    TOO_LARGE,
    UNAUTHORIZED,
    ProtocolError,
    Request,
    encode,
    error,
    parse_request,
)

log = logging.getLogger("nsmount.service")

MAX_CONNECTIONS = 256
MAX_PENDING = 8
#: a connection that sends no complete request for this long is closed
IDLE_SECONDS = 30.0
#: input swallowed after an oversized request before the connection is dropped
DISCARD_LIMIT = 64 << 20
_UCRED = struct.Struct("3i")


class Conn:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
        self.peer_pid, self.uid, self.gid = pid, uid, gid
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.pending = 0
        self.eof = False
        self.closing = False  # close once outbuf is flushed
        self.closed = False
        #: after an oversized request: answer, then swallow input until EOF (closing
        #: with unread input would reset the connection and lose the answer)
        self.discard = 0
        self.idle: Timer | None = None
        self._touch()

    def _touch(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = self.server.reactor.call_later(IDLE_SECONDS, self._idle)

    def _idle(self) -> None:
        if self.pending == 0 and not self.closed:
            self.send(error(None, BAD_REQUEST, f"no request within {IDLE_SECONDS:g}s"))
            self.closing = True
            self._maybe_close()

    def on_event(self, mask: int) -> None:
        if mask & OUT:
            self._flush()
        if mask & IN and self.discard:
            self._swallow()
            return
        if mask & IN and not self.eof and not self.closing:
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                chunk = None
            except OSError:
                self.close()
                return
            if chunk is None:
                pass
            elif not chunk:
                self.eof = True  # half-closed (socat): answer what was asked, then close
                self.server.reactor.modify(self.fd, OUT if self.outbuf else 0)
            else:
                self.inbuf += chunk
                self._lines()
        if mask & (0x008 | 0x010) and not (mask & IN):  # EPOLLERR | EPOLLHUP
            self.close()
            return
        self._maybe_close()

    def _lines(self) -> None:
        while not self.closing:
            nl = self.inbuf.find(b"\n")
            if nl < 0:
                if len(self.inbuf) > MAX_REQUEST:
                    self.send(error(None, TOO_LARGE, f"request larger than {MAX_REQUEST} "
                                    "bytes; closing the connection"))
                    self.inbuf.clear()
                    self.discard = 1
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    self.server.reactor.modify(self.fd, IN)
                return
            line = bytes(self.inbuf[:nl]).rstrip(b"\r")
            del self.inbuf[:nl + 1]
            self._touch()
            if not line.strip():
                continue
            self.server.handle_line(self, line)

    def _swallow(self) -> None:
        try:
            chunk = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.discard += len(chunk)
        if not chunk or self.discard > DISCARD_LIMIT:
            self.close()

    def send(self, obj: dict[str, Any]) -> None:
        if self.closed:
            return
        self.outbuf += encode(obj)
        self._flush()

    def done(self, obj: dict[str, Any]) -> None:
        """Answer to a request that was in flight."""
        self.pending = max(0, self.pending - 1)
        self.send(obj)
        self._maybe_close()

    def _flush(self) -> None:
        if self.closed:
            return
        try:
            while self.outbuf:
                n = self.sock.send(self.outbuf)
                del self.outbuf[:n]
        except BlockingIOError:
            pass
        except OSError:
            self.close()
            return
        want = 0 if (self.eof or self.closing) else IN
        if self.outbuf:
            want |= OUT
        self.server.reactor.modify(self.fd, want)

    def _maybe_close(self) -> None:
        if self.closed:
            return
        if (self.closing or self.eof) and self.pending == 0 and not self.outbuf:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.idle is not None:
            self.idle.cancel()
        self.server.reactor.remove(self.fd)
        self.server.conns.pop(self.fd, None)
        self.sock.close()


class Server:
    def __init__(self, reactor: Reactor, path: str, *, gid: int | None,
                 dispatch: Callable[[Conn, Request], None]) -> None:
        self.reactor = reactor
        self.path = path
        self.gid = gid
        self.dispatch = dispatch
        self.conns: dict[int, Conn] = {}
        self.sock = _listen(path, gid)
        reactor.add(self.sock.fileno(), IN, self._accept)

    def set_group(self, gid: int | None) -> None:
        self.gid = gid
        _set_mode(self.path, gid)

    def authorized(self, conn: Conn) -> bool:
        if conn.uid == 0:
            return True
        if self.gid is None:
            return False
        if conn.gid == self.gid:
            return True
        try:  # supplementary groups of the peer, from the host's /proc (kernel-given pid)
            with open(f"/proc/{conn.peer_pid}/status", "rb") as fh:
                for line in fh.read(1 << 16).splitlines():
                    if line.startswith(b"Groups:"):
                        return str(self.gid).encode() in line.split()[1:]
        except OSError:
            pass
        return False

    def _accept(self, _mask: int) -> None:
        for _ in range(64):
            try:
                s, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("socket: out of file descriptors; refusing a connection")
                    return
                raise
            s.setblocking(False)
            if len(self.conns) >= MAX_CONNECTIONS:
                try:
                    s.send(encode(error(None, BUSY, "too many connections")))
                except OSError:
                    pass
                s.close()
                continue
            conn = Conn(self, s)
            self.conns[conn.fd] = conn
            self.reactor.add(conn.fd, IN, conn.on_event)

    def handle_line(self, conn: Conn, line: bytes) -> None:
        if not self.authorized(conn):
            log.warning("socket: refused a request from uid %d gid %d (pid %d)", conn.uid,
                        conn.gid, conn.peer_pid)
            conn.send(error(None, UNAUTHORIZED, f"uid {conn.uid} may not use this service "
                            "(root only, or the configured socket group)"))
            conn.closing = True
            return
        try:
            req = parse_request(line)
        except ProtocolError as exc:
            log.info("socket: bad request from uid %d: %s", conn.uid, exc.message)
            conn.send(error(exc.req_id, exc.code, exc.message))
            return
        if conn.pending >= MAX_PENDING:
            conn.send(error(req.id, BUSY, f"more than {MAX_PENDING} requests in flight on "
                            "this connection"))
            return
        conn.pending += 1
        self.dispatch(conn, req)

    def close(self) -> None:
        for c in list(self.conns.values()):
            c.close()
        self.reactor.remove(self.sock.fileno())
        self.sock.close()
        try:
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def _listen(path: str, gid: int | None) -> socket.socket:
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, "exists and is not a socket", path)
        os.unlink(path)  # a stale socket of an earlier run
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                      | socket.SOCK_NONBLOCK)
    tmp = f"{path}.{os.getpid()}.{time.monotonic_ns() % 100000}"
    old = os.umask(0o177)
    try:
        s.bind(tmp)
    finally:
        os.umask(old)
    _set_mode(tmp, gid)
    os.rename(tmp, path)  # appears with its final mode: never briefly open
    s.listen(128)
    return s


def _set_mode(path: str, gid: int | None) -> None:
    if gid is None:
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, 0o600)
    else:
        os.chown(path, 0, gid, follow_symlinks=False)
        os.chmod(path, 0o660)
