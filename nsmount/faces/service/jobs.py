"""Run a function in a forked child, off the event loop, under a deadline.

The loop is single-threaded and never blocks on a VM: each batch of per-VM work
(:func:`nsmount.reconnect.reconnect`, which forks its own workers with per-VM
deadlines) runs in a job child.  The child is a process-group leader and dies with
the service (``PR_SET_PDEATHSIG``); at its deadline the whole group is killed.  The
result travels back pickled over a pipe; the child only sends objects it built.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .loop import IN, Reactor

log = logging.getLogger("nsmount.service")

PR_SET_PDEATHSIG = 1


def become_child(setup: Callable[[], None] | None = None) -> None:
    """In a process just forked from the service: its signals are not ours, it leads
    its own process group (killed as one), and it dies with the service.  ``setup``:
    the service's cleanup (closing descriptors the child must not hold)."""
    signal.set_wakeup_fd(-1)  # signals to the child must not wake the service
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.setpgid(0, 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if setup is not None:
        setup()


@dataclass
class Job:
    kind: str
    pid: int
    rfd: int
    deadline: float
    on_done: Callable[[Any, str | None], None]
    buf: bytearray = field(default_factory=bytearray)
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    reaped: bool = False

    def kill(self) -> None:
        """The job's process group, and the child itself: killed right after the fork
        it may not lead its group yet (killpg would find none).  Its pid cannot have
        been reused: the child is ours and not reaped."""
        for send in (os.killpg, os.kill):
            try:
                send(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def finish(self, timed_out: bool = False) -> bool:
        """Call ``on_done(value, error)`` once; True when the child was reaped too.
        A killed child is never waited for (one stuck in an unkillable wait would stop
        the service): then the caller reaps it once its pidfd says it is gone."""
        if self.finished:
            return self.reaped
        self.finished = True
        if timed_out:
            self.kill()
        try:
            os.close(self.rfd)
        except OSError:
            pass
        try:
            # a child that closed its pipe is exiting; a killed one may be stuck
            self.reaped = os.waitpid(self.pid, os.WNOHANG if timed_out else 0)[0] != 0
        except ChildProcessError:
            self.reaped = True
        if timed_out:
            self.on_done(None, "timed out: the job was killed")
            return self.reaped
        try:
            kind, value = pickle.loads(bytes(self.buf)) if self.buf else ("error", "job died")
        except Exception as exc:
            kind, value = "error", f"bad answer from the job: {exc}"
        if kind == "ok":
            self.on_done(value, None)
        else:
            self.on_done(None, str(value))
        return self.reaped


def start(kind: str, fn: Callable[[], Any], *, timeout: float,
          on_done: Callable[[Any, str | None], None],
          child_setup: Callable[[], None] | None = None) -> Job:
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # job child: never returns into the loop
        code = 0
        try:
            os.close(r)
            become_child(child_setup)
            try:
                res: tuple[str, Any] = ("ok", fn())
            except BaseException as exc:  # the loop turns it into failures
                res = ("error", f"{type(exc).__name__}: {exc}")
            try:
                data = pickle.dumps(res)
            except Exception as exc:
                data = pickle.dumps(("error", f"unpicklable result: {exc}"))
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    os.set_blocking(r, False)
    return Job(kind, pid, r, time.monotonic() + timeout, on_done)


def reap_later(reactor: Reactor, pid: int, pidfd: int | None = None) -> None:
    """Wait for a (killed) child without blocking the loop: once its pidfd says it is
    gone.  A child stuck in an unkillable wait is never waited for.  ``pidfd`` is
    taken over (opened here when not given)."""
    if pidfd is None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone and reaped already
    fd = pidfd

    def reap(_mask: int) -> None:
        reactor.remove(fd)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        os.close(fd)

    reactor.add(fd, IN, reap)
