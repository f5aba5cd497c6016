"""The fd ops of the service: devices for unprivileged users, as the policy allows.

``open-device`` answers with an open device fd (``SCM_RIGHTS``), never a path.  The
client proves which VM it acts for by attaching that QEMU's pidfd; before anything
else the service checks that the fd really is a pidfd, that its process is alive and
that its real and effective uid are the peer's (``PIDFD_GET_INFO``: from the task
itself, no /proc path, no pid race; the peer's uid and groups come from the kernel
too, ``SO_PEERCRED`` and ``SO_PEERGROUPS``).  Then the policy
(:mod:`nsmount.model.policy`) decides on the path as asked and the host node it
resolves to, and :func:`nsmount.faces.fdpass.open_device` opens exactly the node it
verified.  Every decision is logged: granted or refused, uid, pid, path, reason.

This runs in the event loop, not in a job: nothing here touches a VM (the node is on
the host's /dev, resolved from the host's root and opened ``O_NONBLOCK``), and a fork
per request would cost more than the whole answer.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

from ...errors import DeniedError, NsmountError, RefusedError
from ...kernel import syscalls
from ...model.display import escape_name, safe_line
from ...model.policy import Policy, PolicyError
from ...state.libvirtspec import resolve_group, resolve_user
from . import config as configmod
from .protocol import BAD_PIDFD, BUSY, DENIED, FAILED, TIMEOUT, Request, error, ok
from .server import Conn, close_fds

log = logging.getLogger("nsmount.service")


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: device-bind jobs one uid may have in flight, and the most seconds one may take
BINDS_PER_UID = 2
BIND_SECONDS = 10.0


class DeviceGate:
    """The policy in force and the fd ops' checks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.policy = Policy(None, ())
        #: device-bind jobs in flight per uid: a user whose namespace blocks (a FUSE
        #: mount nobody answers over its /) holds at most BINDS_PER_UID job slots, each
        #: for at most BIND_SECONDS, never all of root's
        self.binds: dict[int, int] = {}

    def load(self, path: str | None = None, *, strict: bool = False) -> None:
        """(Re)read the policy; a bad file keeps the last good policy (PolicyError is
        logged, one line naming file and line) -- or, ``strict`` (at start-up, when
        there is none yet), raises it."""
        path = path or self.path
        try:
            pol = configmod.load_policy(path)
        except PolicyError as exc:
            if strict:
                raise
            log.error("%s; keeping the last good policy", exc.oneline())
            return
        pol, notes = pol.resolved(resolve_user, resolve_group)
        for note in notes:
            log.warning("%s", safe_line(note))
        self.path, self.policy = path, pol
        n = len(pol.rules)
        log.info("device policy %s: %s", path, f"{n} rule(s)" if pol.path
                 else "no such file, nothing granted")

    # ------------------------------------------------------------------ identity
    @staticmethod
    def vm_of(conn: Conn, pidfd: int) -> syscalls.PidfdInfo:
        """The process the attached pidfd names, checked to be alive and the peer's own
        (real and effective uid); Refused(bad-pidfd) otherwise."""
        if not syscalls.is_pidfd(pidfd):
            raise Refused(BAD_PIDFD, "the attached fd is not a pidfd (attach the pidfd of "
                          "the VM's QEMU, from pidfd_open)")
        try:
            info = syscalls.pidfd_info(pidfd)
        except OSError as exc:
            if exc.errno == errno.ESRCH:
                raise Refused(BAD_PIDFD, "the process of the attached pidfd has exited") \
                    from None
            raise Refused(BAD_PIDFD, f"cannot ask the kernel about the pidfd: {exc.strerror} "
                          "(PIDFD_GET_INFO needs Linux 6.13)") from None
        if (info.ruid, info.euid) != (conn.uid, conn.uid):
            raise Refused(BAD_PIDFD, f"pid {info.pid} belongs to uid {info.ruid}, not to the "
                          f"asking uid {conn.uid}: a user may only ask for its own VMs")
        return info

    def decide(self, conn: Conn, path: str, write: bool) -> str:
        """The policy's grant (its reason) for the peer, or Refused(denied).  Who asks
        is what the kernel says (``SO_PEERCRED``, ``SO_PEERGROUPS``), ids only: the
        policy's names were resolved when it was loaded, so no request waits on the
        name service."""
        d = self.policy.decide(uid=conn.uid, user=None, gids=conn.groups(),
                               groups=frozenset(), path=path, write=write)
        if not d.granted:
            raise Refused(DENIED, d.reason)
        return d.reason

    # ------------------------------------------------------------------ open-device
    def open_device(self, conn: Conn, req: Request, pidfd: int) -> None:
        """Answer ``open-device`` on ``conn`` (the device fd attached), closing
        ``pidfd``."""
        from ..fdpass import open_device

        pid = -1
        path = str(req.path)
        access = "rw" if req.write else "ro"
        try:
            pid = self.vm_of(conn, pidfd).pid
            granted = self.decide(conn, path, req.write)
            try:
                dev = open_device(path, write=req.write)
            except NsmountError as exc:
                raise Refused(FAILED, exc.oneline()) from None
        except Refused as exc:
            log.warning("open-device: refused uid=%d pid=%d path=%s access=%s: %s", conn.uid,
                        pid, escape_name(path), access, safe_line(exc.message))
            conn.done(error(req.id, exc.code, exc.message))
            return
        finally:
            close_fds([pidfd])
        log.info("open-device: granted uid=%d pid=%d path=%s node=%s access=%s (%s)",
                 conn.uid, pid, escape_name(path), escape_name(dev.node.path), access,
                 safe_line(granted))
        result: dict[str, Any] = {**dev.to_dict(), "pid": pid}
        conn.done(ok(req.id, result), dev.fd)
        dev.fd = -1  # the connection owns it now

    # ------------------------------------------------------------------ device-bind
    def device_bind(self, conn: Conn, req: Request, pidfd: int,
                    start_job: Callable[[str, Callable[[], Any], float,
                                         Callable[[Any, str | None], None]], None]) -> None:
        """Answer ``device-bind``: the pidfd and the policy are checked here, in the
        loop; the bind itself (:func:`nsmount.faces.devbind.bind_device`) runs in a
        forked job under the request's deadline.  ``pidfd`` is closed once the job has
        its own copy."""
        from ..devbind import bind_device

        path = str(req.path)
        pid = -1
        if self.binds.get(conn.uid, 0) >= BINDS_PER_UID:
            close_fds([pidfd])
            conn.done(error(req.id, BUSY, f"{BINDS_PER_UID} device-bind requests of uid "
                            f"{conn.uid} are in flight; ask again when they are answered"))
            return
        try:
            try:
                pid = self.vm_of(conn, pidfd).pid
                try:
                    reason = self.decide(conn, path, req.write)
                    read_only = not req.write
                except Refused as first:
                    if not req.write:
                        raise
                    try:  # a read-only grant: a read-only bind
                        reason = self.decide(conn, path, False)
                    except Refused:
                        raise first from None
                    read_only = True
            except Refused as exc:
                log.warning("device-bind: refused uid=%d pid=%d path=%s: %s", conn.uid, pid,
                            escape_name(path), safe_line(exc.message))
                conn.done(error(req.id, exc.code, exc.message))
                close_fds([pidfd])
                return
        except BaseException:
            close_fds([pidfd])
            raise
        uid, gid = conn.uid, conn.gid

        def work() -> dict[str, Any]:
            try:
                return bind_device(pidfd, uid, gid, path, read_only=read_only)
            except NsmountError as exc:  # not this user's rootless VM, or its /dev
                return {"status": "failed", "error": exc.oneline(),  # is in the way
                        "denied": isinstance(exc, (DeniedError, RefusedError))}

        def done(value: Any, err: str | None) -> None:
            close_fds([pidfd])
            self.binds[uid] -= 1
            if not self.binds[uid]:
                del self.binds[uid]
            if err is None and value.get("status") != "failed":
                log.info("device-bind: granted uid=%d pid=%d path=%s node=%s %s (%s): %s",
                         uid, pid, escape_name(path), escape_name(value.get("node", "")),
                         "ro" if read_only else "rw", safe_line(reason), value["status"])
                conn.done(ok(req.id, {**value, "pid": pid}))
                return
            msg = err if err is not None else str(value.get("error"))
            code = TIMEOUT if err and err.startswith("timed out") else \
                DENIED if value and value.get("denied") else FAILED
            log.warning("device-bind: refused uid=%d pid=%d path=%s: %s", uid, pid,
                        escape_name(path), safe_line(msg))
            conn.done(error(req.id, code, msg))

        self.binds[uid] = self.binds.get(uid, 0) + 1
        start_job("device-bind", work, min(req.timeout, BIND_SECONDS) + 5.0, done)
