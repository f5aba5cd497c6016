"""Run per-VM work in forked worker processes, each VM under a deadline.

A hostile VM can make any step that touches its namespace block: a FUSE mount
nobody answers stacked on ``/dev/shm``, a frozen process.  A thread stuck in such a
call cannot be stopped; a process can.  So the work for VMs runs in forked workers
and the parent only watches: before each VM a worker says which one it starts, the
parent keeps that VM's deadline, and when it passes the worker is killed with
SIGKILL, that VM gets a failed outcome ("timed out ... abandoned"), and a fresh
worker takes over the VMs that shard had not reached.  A worker that dies for any
other reason is handled the same way.  One VM's failure never stops the others and
the parent always returns a result for every item.

A forked worker is single-threaded, so it may ``setns`` from its main thread
without ``unshare(CLONE_FS)``; it must go back to the host namespace between VMs
(:meth:`nsmount.pipeline.session.VmSession.work` always does).  Results travel back pickled,
length-prefixed, over a pipe: only objects the worker built itself, never bytes a
VM wrote.
"""

from __future__ import annotations

import gc
import os
import pickle
import select
import signal
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..engine import executor

T = TypeVar("T")
R = TypeVar("R")

#: seconds one VM may take (lock wait included) before it is abandoned
DEFAULT_TIMEOUT = 30.0

#: a frame: kind, item index, payload length; "begin" frames carry no payload
_HEADER = struct.Struct("=BII")
_BEGIN, _DONE, _RAISED = 1, 2, 3
#: how long a killed worker may take to go away before it is left to the kernel
_REAP_SECONDS = 2.0


def _frame(kind: int, idx: int, obj: object = None) -> bytes:
    data = b"" if kind == _BEGIN else pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(kind, idx, len(data)) + data


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclass
class _Worker(Generic[T]):
    pid: int
    pidfd: int
    rfd: int
    items: dict[int, T]  # index in the caller's list -> item, still to do
    current: int | None = None  # index of the item being worked on
    started: float = 0.0
    buf: bytearray = field(default_factory=bytearray)


def _spawn(items: list[tuple[int, T]], fn: Callable[[T], R]) -> _Worker[T]:
    r, w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # worker: never returns into the caller
        code = 0
        # a collection would touch every object the parent has: copy-on-write of the
        # whole heap.  A worker is short-lived and makes little garbage.
        gc.disable()
        try:
            os.close(r)
            executor.WORKER_OF = parent  # crash injection takes the parent down too
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # one write (one wake-up of the parent) per item: its result and the
            # start of the next one travel together
            pending = _frame(_BEGIN, items[0][0]) if items else b""
            for n, (idx, item) in enumerate(items):
                _write(w, pending)
                res: object
                try:
                    kind, res = _DONE, fn(item)
                except BaseException as exc:  # the caller turns it into a failure
                    kind, res = _RAISED, exc
                try:
                    pending = _frame(kind, idx, res)
                except (pickle.PicklingError, TypeError, AttributeError) as exc:
                    pending = _frame(_RAISED, idx, RuntimeError(f"unpicklable result: {exc}"))
                if n + 1 < len(items):
                    pending += _frame(_BEGIN, items[n + 1][0])
            _write(w, pending)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return _Worker(pid, os.pidfd_open(pid), r, dict(items))


def _readable(fds: list[int], timeout: float) -> list[int]:
    """The fds of ``fds`` that are readable (or hung up) within ``timeout`` seconds.
    poll, not select: a caller that tracks 1000 VMs (the service: a pidfd each) hands
    its workers fd numbers above select's limit of 1024."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return [fd for fd, _ev in p.poll(max(0, int(timeout * 1000) + 1))]


def _reap(wk: _Worker[T], *, kill: bool) -> None:
    if kill:
        try:
            os.kill(wk.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # a worker stuck in an unkillable wait is left to the kernel, never waited for
    if _readable([wk.pidfd], _REAP_SECONDS):
        try:
            os.waitpid(wk.pid, 0)
        except ChildProcessError:
            pass
    for fd in (wk.rfd, wk.pidfd):
        try:
            os.close(fd)
        except OSError:
            pass


def run_all(items: Sequence[T], fn: Callable[[T], R], *, workers: int, timeout: float,
            on_result: Callable[[T, R], None],
            on_error: Callable[[T, BaseException], None],
            on_lost: Callable[[T, str], None]) -> None:
    """Call ``fn(item)`` for every item in ``workers`` forked processes.

    For each item exactly one of ``on_result(item, value)``, ``on_error(item, exc)``
    (``fn`` raised) or ``on_lost(item, why)`` (deadline passed or the worker died) is
    called, in the parent, as results arrive.  ``timeout`` is per item (seconds).
    """
    todo = list(enumerate(items))
    n = max(1, min(workers, len(todo)))
    live: dict[int, _Worker[T]] = {}
    for k in range(n):
        shard = todo[k::n]
        if shard:
            wk = _spawn(shard, fn)
            live[wk.rfd] = wk

    def lost(wk: _Worker[T], why: str, *, kill: bool) -> None:
        del live[wk.rfd]
        _reap(wk, kill=kill)
        rest = wk.items
        if wk.current is not None:
            on_lost(rest.pop(wk.current), why)
        if rest:
            nw = _spawn(list(rest.items()), fn)
            live[nw.rfd] = nw

    try:
        while live:
            now = time.monotonic()
            expired = [wk for wk in live.values()
                       if wk.current is not None and now - wk.started > timeout]
            for wk in expired:
                lost(wk, f"timed out after {timeout:g}s; the VM's worker was killed and the "
                     "VM abandoned", kill=True)
            if not live:
                break
            waits = [wk.started + timeout - now for wk in live.values()
                     if wk.current is not None]
            wait = max(0.0, min(waits)) + 0.01 if waits else timeout
            ready = _readable(list(live), wait)
            for rfd in ready:
                found = live.get(rfd)
                if found is None:
                    continue
                wk = found
                chunk = os.read(rfd, 1 << 16)
                if not chunk:
                    if wk.current is None and not wk.items:
                        del live[rfd]
                        _reap(wk, kill=False)
                    else:
                        lost(wk, "its worker process died", kill=True)
                    continue
                wk.buf += chunk
                pos = 0
                while len(wk.buf) - pos >= _HEADER.size:
                    kind, idx, size = _HEADER.unpack_from(wk.buf, pos)
                    end = pos + _HEADER.size + size
                    if len(wk.buf) < end:
                        break
                    if kind == _BEGIN:
                        wk.current, wk.started = idx, time.monotonic()
                    else:
                        val = pickle.loads(wk.buf[pos + _HEADER.size:end])
                        item = wk.items.pop(idx)
                        wk.current = None
                        (on_result if kind == _DONE else on_error)(item, val)
                    pos = end
                del wk.buf[:pos]
    finally:
        for wk in list(live.values()):
            _reap(wk, kill=True)


def run_one(fn: Callable[[], R], *, timeout: float) -> R:
    """``fn()`` in one forked worker under a deadline: its value, its exception
    re-raised, or :class:`~nsmount.errors.DeadlineError`."""
    from ..errors import DeadlineError, NsmountError

    box: dict[str, object] = {}

    def lost(_item: object, why: str) -> None:
        box["error"] = DeadlineError(why) if why.startswith("timed out") else NsmountError(why)

    run_all([None], lambda _item: fn(), workers=1, timeout=timeout,
            on_result=lambda _i, v: box.__setitem__("value", v),
            on_error=lambda _i, e: box.__setitem__("error", e), on_lost=lost)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]
