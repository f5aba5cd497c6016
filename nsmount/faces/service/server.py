"""The local socket: ``$STATE/nsmount.sock``, line-delimited JSON (:mod:`.protocol`).

Root-only by default (0600); with a configured group 0660 ``root:GROUP``.  Every
request's peer credentials (``SO_PEERCRED``) are checked: only root or a member of the
socket group is served, whatever the file mode says -- except the fd ops
(:data:`.protocol.FD_OPS`), which any local user may send and the device policy
decides.  While the policy grants anything the socket is 0666 and its directory
0711 (reachable, not listable); otherwise they are closed again.

Ancillary data: every read is ``recvmsg`` with ``MSG_CMSG_CLOEXEC`` and room for
:data:`.protocol.MAX_REQUEST_FDS` fds; fds that arrive belong to the request whose
line they arrived in, only an fd op may keep them (as its pidfd), every other fd is
closed at once, and a truncated control message (``MSG_CTRUNC``: more fds than that)
refuses the request.  An answer may carry one fd, sent with the answer's first byte;
an fd not yet sent when the connection goes is closed.  Bounded: line size, requests
in flight per connection, connections (in all and per non-root uid), idle time.  A
bad request gets an error answer; nothing a client sends stops the service.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import queue
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ...kernel.scm import fds_from_ancdata
from ...model.display import escape_name
from .loop import IN, OUT, Reactor, Timer
from .protocol import (
    BAD_PIDFD,
    BAD_REQUEST,
    BUSY,
    FD_OPS,
    MAX_REQUEST,
    MAX_REQUEST_FDS,
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
#: of those, kept for root and the socket group: users with many uids (a subuid range)
#: cannot fill the socket
RESERVED_CONNECTIONS = 64
#: connections one non-root uid may hold at once (the socket may be world-reachable)
MAX_USER_CONNECTIONS = 64
MAX_PENDING = 8
#: a connection that sends no complete request for this long is closed
IDLE_SECONDS = 30.0
#: answers a connection may have waiting before its further requests wait unread
OUT_HIGH = 256 << 10
#: input swallowed after an oversized request before the connection is dropped
DISCARD_LIMIT = 64 << 20
_UCRED = struct.Struct("3i")
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: ancillary buffer of one read: room for MAX_REQUEST_FDS fds (alignment may leave
#: room for one more; the count is checked per request line)
_CMSG_SPACE = socket.CMSG_SPACE(MAX_REQUEST_FDS * 4)


class _Closer:
    """Closes the fds peers sent, off the event loop.  close() of a file on the peer's
    own FUSE mount sends FUSE_FLUSH and waits for a daemon that need not answer: done
    in the loop, any local user could freeze the service.  One daemon thread closes
    them in order; a close that never returns leaves later fds queued (logged), the
    loop never waits."""

    WARN_AT = 1024

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.warned = False

    def close(self, fds: list[int]) -> None:
        for fd in fds:
            self.queue.put(fd)
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="nsmount-fd-closer",
                                           daemon=True)
            self.thread.start()
        if self.queue.qsize() > self.WARN_AT and not self.warned:
            self.warned = True
            log.error("socket: %d fds sent by clients wait to be closed: a close blocks "
                      "(a file on a FUSE mount nobody answers?)", self.queue.qsize())

    def _run(self) -> None:
        while True:
            fd = self.queue.get()
            try:
                os.close(fd)
            except OSError:
                pass


_CLOSER = _Closer()


def close_fds(fds: list[int]) -> None:
    """Close fds a peer sent (or that came from one): never in the caller's thread."""
    if fds:
        _CLOSER.close(list(fds))


class Conn:
    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
        self.peer_pid, self.uid, self.gid = pid, uid, gid
        self._groups: frozenset[int] | None = None
        self.inbuf = bytearray()
        #: stream offset of inbuf[0]; fds in: (stream offset they came with, fd, or None
        #: for a truncated control message there)
        self.in_off = 0
        self.infds: deque[tuple[int, int | None]] = deque()
        self.outbuf = bytearray()
        #: stream offset of outbuf[0]; fds out: (stream offset of their first byte, fd)
        self.out_off = 0
        self.outfds: deque[tuple[int, int]] = deque()
        self.pending = 0
        self.eof = False
        self.closing = False  # close once outbuf is flushed
        self.closed = False
        self.in_lines = False  # _lines is running (an answer sent from it flushes)
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
                chunk: bytes | None = self._recv()
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

    def _recv(self) -> bytes:
        """One read with its ancillary data; fds are remembered with the stream offset
        of the first byte they came with (None: the control message was truncated)."""
        data, anc, flags, _ = self.sock.recvmsg(1 << 16, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds = fds_from_ancdata(anc)
        at = self.in_off + len(self.inbuf)
        for fd in fds:
            self.infds.append((at, fd))
        if flags & socket.MSG_CTRUNC:
            self.infds.append((at, None))
        if (fds or flags & socket.MSG_CTRUNC) and not data:
            self._drop_fds(at + 1)  # fds with no byte cannot happen on a stream
        return data

    def _trim_fds(self) -> None:
        """After the complete lines are taken: the fds left belong to the line still
        arriving.  Keep at most MAX_REQUEST_FDS of them (one byte and one fd per write
        must not pile up fds in the service); the rest are closed and the line is
        marked to be refused."""
        real = [e for e in self.infds if e[1] is not None]
        if len(real) <= MAX_REQUEST_FDS:
            return
        keep = real[:MAX_REQUEST_FDS]
        close_fds([fd for _, fd in real[MAX_REQUEST_FDS:] if fd is not None])
        self.infds = deque([*keep, (keep[-1][0], None)])

    def _take_fds(self, end: int) -> tuple[list[int], bool]:
        """The fds that came with bytes before stream offset ``end`` (one request line),
        and whether any control message was truncated there."""
        fds: list[int] = []
        trunc = False
        while self.infds and self.infds[0][0] < end:
            fd = self.infds.popleft()[1]
            if fd is None:
                trunc = True
            else:
                fds.append(fd)
        return fds, trunc

    def _drop_fds(self, end: int | None = None) -> None:
        fds, _ = self._take_fds(end if end is not None else 1 << 62)
        close_fds(fds)

    def _lines(self) -> None:
        if self.in_lines:
            return
        self.in_lines = True
        try:
            self._each_line()
        finally:
            self.in_lines = False

    def _each_line(self) -> None:
        # a client that sends and never reads: its answers wait in outbuf, and its
        # next lines wait unread (no IN in the poll mask) until they are taken
        while not self.closing and len(self.outbuf) <= OUT_HIGH:
            nl = self.inbuf.find(b"\n")
            if nl < 0:
                if len(self.inbuf) > MAX_REQUEST:
                    self.send(error(None, TOO_LARGE, f"request larger than {MAX_REQUEST} "
                                    "bytes; closing the connection"))
                    self.in_off += len(self.inbuf)
                    self.inbuf.clear()
                    self._drop_fds()
                    self.discard = 1
                    try:
                        self.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    self.server.reactor.modify(self.fd, IN)
                break
            line = bytes(self.inbuf[:nl]).rstrip(b"\r")
            del self.inbuf[:nl + 1]
            self.in_off += nl + 1
            fds, trunc = self._take_fds(self.in_off)
            self._touch()
            if not line.strip():
                close_fds(fds)
                continue
            self.server.handle_line(self, line, fds, trunc)
        self._trim_fds()

    def _swallow(self) -> None:
        try:
            chunk = self._recv()
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.in_off += len(chunk)
        self._drop_fds()
        self.discard += len(chunk)
        if not chunk or self.discard > DISCARD_LIMIT:
            self.close()

    def send(self, obj: dict[str, Any], fd: int | None = None) -> None:
        """Queue one answer line; ``fd`` (owned by the connection from now on, closed
        once sent or when the connection goes) travels with its first byte."""
        if self.closed:
            if fd is not None:
                close_fds([fd])
            return
        if fd is not None:
            self.outfds.append((self.out_off + len(self.outbuf), fd))
        self.outbuf += encode(obj)
        self._flush()

    def done(self, obj: dict[str, Any], fd: int | None = None) -> None:
        """Answer to a request that was in flight."""
        self.pending = max(0, self.pending - 1)
        if self.pending == 0:
            self._touch()  # the idle time counts from the last answer (a request that
            # took longer than IDLE_SECONDS found the timer already gone: never closed)
        self.send(obj, fd)
        self._maybe_close()

    def _flush(self) -> None:
        if self.closed:
            return
        try:
            while self.outbuf:
                if self.outfds and self.outfds[0][0] == self.out_off:
                    fd = self.outfds[0][1]
                    n = self.sock.sendmsg([self.outbuf], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                            array.array("i", [fd]))])
                    self.outfds.popleft()
                    os.close(fd)  # the peer has its own copy now
                elif self.outfds:  # up to the byte the next fd goes with
                    n = self.sock.send(memoryview(self.outbuf)[:self.outfds[0][0]
                                                               - self.out_off])
                else:
                    n = self.sock.send(self.outbuf)
                del self.outbuf[:n]
                self.out_off += n
        except BlockingIOError:
            pass
        except OSError:
            self.close()
            return
        want = 0 if (self.eof or self.closing or len(self.outbuf) > OUT_HIGH) else IN
        if self.outbuf:
            want |= OUT
        self.server.reactor.modify(self.fd, want)
        if len(self.outbuf) <= OUT_HIGH and b"\n" in self.inbuf and not self.closing:
            self._lines()  # lines held back while the client did not read

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
        self.server.per_uid[self.uid] = self.server.per_uid.get(self.uid, 1) - 1
        self._drop_fds()
        close_fds([fd for _, fd in self.outfds])
        self.outfds.clear()
        self.sock.close()

    def held_fds(self) -> list[int]:
        """The fds this connection holds besides its socket: received with a line still
        arriving, or waiting to go out with an answer."""
        return [fd for _, fd in self.infds if fd is not None] + [fd for _, fd in self.outfds]

    def groups(self) -> frozenset[int]:
        """The peer's primary and supplementary groups as the kernel recorded them at
        connect time (``SO_PEERGROUPS``): no /proc read, no pid race."""
        if self._groups is None:
            self._groups = self._peer_groups()
        return self._groups

    def _peer_groups(self) -> frozenset[int]:
        try:
            raw = self.sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 65536)
        except OSError:
            raw = b""
        a = array.array("I")
        a.frombytes(raw[:len(raw) - len(raw) % 4])
        return frozenset([self.gid, *a])


class Server:
    def __init__(self, reactor: Reactor, path: str, *, gid: int | None,
                 dispatch: Callable[[Conn, Request, int], None],
                 public: bool = False) -> None:
        self.reactor = reactor
        self.path = path
        self.gid = gid
        self.public = public
        self.dispatch = dispatch
        self.conns: dict[int, Conn] = {}
        self.per_uid: dict[int, int] = {}
        self.sock = _listen(path, gid, public)
        reactor.add(self.sock.fileno(), IN, self._accept)

    def set_group(self, gid: int | None) -> None:
        self.gid = gid
        _set_mode(self.path, gid, self.public)

    def set_public(self, public: bool) -> None:
        """Open the socket to every local user (the policy grants something) or close
        it again to root and the socket group."""
        if public != self.public:
            self.public = public
            _set_mode(self.path, self.gid, public)
            log.info("socket %s: %s", self.path, "reachable by every local user for the fd "
                     "ops (the device policy grants something)" if public else
                     "root and the socket group only")

    def authorized(self, conn: Conn) -> bool:
        """May the peer use every op (root, or a member of the socket group)?"""
        if conn.uid == 0:
            return True
        if self.gid is None:
            return False
        return self.gid in conn.groups()

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
                _refuse(s, None, "too many connections")
                continue
            conn = Conn(self, s)
            n = self.per_uid.get(conn.uid, 0)
            if conn.uid != 0 and not self.authorized(conn) \
                    and len(self.conns) >= MAX_CONNECTIONS - RESERVED_CONNECTIONS:
                # the last slots are kept for root and the socket group (libvirt's hook)
                log.warning("socket: refusing uid %d: the connections left are kept for "
                            "root and the socket group", conn.uid)
                _refuse(s, conn, "too many connections")
                continue
            if conn.uid != 0 and n >= MAX_USER_CONNECTIONS:
                log.warning("socket: uid %d already holds %d connections; refusing one more",
                            conn.uid, n)
                _refuse(s, conn, f"more than {MAX_USER_CONNECTIONS} connections for this uid")
                continue
            self.per_uid[conn.uid] = n + 1
            self.conns[conn.fd] = conn
            self.reactor.add(conn.fd, IN, conn.on_event)

    def handle_line(self, conn: Conn, line: bytes, fds: list[int] | None = None,
                    truncated: bool = False) -> None:
        """One request line and the fds that came with it: only an fd op keeps one (its
        pidfd, handed to dispatch, which owns it then); every other fd is closed here."""
        fds = list(fds or ())
        try:
            self._handle(conn, line, fds, truncated)
        finally:
            close_fds(fds)

    def _handle(self, conn: Conn, line: bytes, fds: list[int], truncated: bool) -> None:
        try:
            req: Request | None = parse_request(line)
        except ProtocolError as exc:
            req, perr = None, exc
        public_op = req is not None and req.op in FD_OPS
        # a malformed line gets its error whoever sent it (nothing was done); a valid
        # request for an op the peer may not use closes the connection
        if req is not None and not public_op and not self.authorized(conn):
            log.warning("socket: refused a request from uid %d gid %d (pid %d)", conn.uid,
                        conn.gid, conn.peer_pid)
            conn.send(error(None, UNAUTHORIZED, f"uid {conn.uid} may not use this service "
                            "(root only, or the configured socket group; any user may "
                            f"only send {', '.join(FD_OPS)})"))
            conn.closing = True
            return
        if req is None:
            log.info("socket: bad request from uid %d: %s", conn.uid, perr.message)
            conn.send(error(perr.req_id, perr.code, perr.message))
            return
        if (fds and not public_op) or truncated:
            log.warning("socket: uid %d pid %d attached %s fd(s) to a %s request; closed",
                        conn.uid, conn.peer_pid, "too many" if truncated else len(fds), req.op)
        if not public_op:  # closed before any job is forked: no child inherits them
            close_fds(fds)
            fds.clear()
        if truncated:
            conn.send(error(req.id, BAD_REQUEST, f"more than {MAX_REQUEST_FDS} fd attached "
                            "to a request; all were closed"))
            return
        if public_op and len(fds) != 1:
            came = "none came" if not fds else f"{len(fds)} came (all closed)"
            log.warning("%s: refused uid=%d pid=%d path=%s: %s fds attached", req.op,
                        conn.uid, conn.peer_pid, escape_name(str(req.path)), len(fds))
            conn.send(error(req.id, BAD_PIDFD, f"{req.op} needs the pidfd of the VM's process "
                            f"attached with SCM_RIGHTS (exactly one fd); {came}"))
            return
        if conn.pending >= MAX_PENDING:
            conn.send(error(req.id, BUSY, f"more than {MAX_PENDING} requests in flight on "
                            "this connection"))
            return
        conn.pending += 1
        pidfd = fds.pop() if public_op else -1
        self.dispatch(conn, req, pidfd)

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


def _refuse(s: socket.socket, conn: Conn | None, why: str) -> None:
    """A connection turned away at accept: one ``busy`` answer, then closed."""
    try:
        s.send(encode(error(None, BUSY, why)))
    except OSError:
        pass
    if conn is not None and conn.idle is not None:
        conn.idle.cancel()
    s.close()


def _listen(path: str, gid: int | None, public: bool) -> socket.socket:
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
    _set_mode(tmp, gid, public)
    os.rename(tmp, path)  # appears with its final mode: never briefly open
    s.listen(128)
    return s


def _set_mode(path: str, gid: int | None, public: bool = False) -> None:
    """0600 root, 0660 root:GROUP, or (public) 0666.  The state directory (root's,
    the service's own) is 0711 while public -- every user may reach the socket by
    name, nobody else may list it -- and 0700 otherwise (0710 root:GROUP with a
    socket group)."""
    os.chown(path, 0, 0 if gid is None else gid, follow_symlinks=False)
    os.chmod(path, 0o666 if public else 0o600 if gid is None else 0o660)
    d = os.path.dirname(path)
    st = os.stat(d, follow_symlinks=False)
    if st.st_uid == 0 and stat.S_ISDIR(st.st_mode):
        if gid is not None and st.st_gid != gid:
            os.chown(d, 0, gid, follow_symlinks=False)
        os.chmod(d, 0o711 if public else 0o700 if gid is None else 0o710)
