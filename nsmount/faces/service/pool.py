"""Warm worker processes for the service's per-VM work.

Every piece of work that touches a VM runs in a worker process, never in the event
loop: a hostile VM can block any step (a FUSE mount nobody answers, a frozen
process), and only a process can be stopped.  Forking a fresh child per batch or per
hook request is what the service did first; on a small virtual machine the child then
spends more time on copy-on-write faults of the inherited heap than on the VM (a
100-VM batch took ~1.6x as long in a fresh child as in a warm process).

So the pool keeps ``size`` workers alive and hands them one task at a time over a
pipe (pickled, length-prefixed; the worker only ever unpickles what the service
wrote, the service only what its own worker built -- never bytes a VM wrote).  A task
is a list of items (VMs); the worker streams back "begin item i" and "result of item
i" frames without waiting for the service, so a batch costs one hand-over per worker,
not one per VM.  Each item has a deadline from its "begin": a worker past it is
killed (SIGKILL), that item is reported, the task's remaining items go back to the
front of their queue, and a fresh worker takes over when there is work.

Two queues, both first come, first served: urgent tasks (a socket request someone
waits for: the libvirt hook) go before the others; but while other tasks wait and no
worker works on one, the next idle worker takes one of those, so requests can never
starve the event batches.  When no worker is idle an urgent task may start extra
workers, up to ``max_size``, one for each worker held by something else: one on a
non-urgent task (an event batch), or one whose current item has run :data:`STUCK`
seconds (a VM that blocks it).  While every worker makes progress on
urgent work, more processes than CPUs would only take turns and pay for their fork
(a libvirt daemon restart sends a request per domain at once: 1000 requests started
8 extra workers on 2 CPUs, and the burst took longer than with none).  Extra workers
leave after :data:`IDLE_RETIRE` seconds without work; a worker is replaced after
:data:`MAX_ITEMS` items, or after a task when it asks to be (its
``context["retire"]``: see :mod:`.tasks`), which bounds what one process can
accumulate.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .jobs import become_child, reap_later
from .loop import IN, Reactor, Timer

log = logging.getLogger("nsmount.service")

#: seconds an extra worker (beyond ``size``) may stay idle before it leaves
IDLE_RETIRE = 10.0
#: items (VMs) one worker works on before it is replaced by a fresh one
MAX_ITEMS = 10000
#: the shortest deadline an item gets (a client may ask for less; a worker killed at
#: once would only cost forks)
MIN_TIMEOUT = 1.0
#: seconds an item may hold a worker before an urgent task waiting for one may start
#: an extra worker (see the module's docstring)
STUCK = 0.05
#: seconds before a worker that could not be started is tried again, and how often
SPAWN_RETRY, SPAWN_TRIES = 1.0, 5
_LEN = struct.Struct("=I")
#: a frame from a worker: kind, item index, payload length
_HEAD = struct.Struct("=BII")
_BEGIN, _DONE, _RAISED, _END = 1, 2, 3, 4

#: a task kind's function, run in a worker: ``fn(item, context) -> value``
TaskFn = Callable[[Any, dict[str, Any]], Any]


@dataclass
class Task:
    """``kind``'s function applied to each item; ``on_item(item, value, None)`` or
    ``on_item(item, None, why)`` is called exactly once per item, in the loop."""

    kind: str  # a key of the pool's task table
    items: list[Any]
    timeout: float  # seconds per item, from the moment a worker begins it
    on_item: Callable[[Any, Any, str | None], None]
    urgent: bool = False  # someone waits: goes first, and may start an extra worker
    tries: int = 0  # workers lost before they answered anything of this task


@dataclass
class _Worker:
    pid: int
    pidfd: int
    wfd: int  # tasks to the worker
    rfd: int  # answers from the worker
    task: Task | None = None
    left: dict[int, Any] = field(default_factory=dict)  # index -> item not answered yet
    answered: int = 0  # items of the current task answered
    current: int | None = None  # index of the item being worked on
    begun: float = 0.0  # monotonic time the current item began
    timer: Timer | None = None
    items: int = 0  # items answered over the worker's life
    idle_since: float = field(default_factory=time.monotonic)
    buf: bytearray = field(default_factory=bytearray)


class Pool:
    def __init__(self, reactor: Reactor, tasks: dict[str, TaskFn], *, size: int,
                 max_size: int, child_setup: Callable[[], None] | None = None,
                 after_task: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.reactor = reactor
        self.tasks = tasks
        #: run in the worker after each task, before it reports the task's end (a check
        #: of itself that may set ``context["retire"]``)
        self.after_task = after_task
        self.size = max(1, size)
        self.max_size = max(self.size, max_size)
        #: run in every new worker first (the service closes its own fds there)
        self.child_setup = child_setup
        self.workers: dict[int, _Worker] = {}  # rfd -> worker
        self.urgent: deque[Task] = deque()
        self.normal: deque[Task] = deque()
        self.closed = False
        self.killed = 0
        self.spawn_failures = 0
        self.retry: Timer | None = None
        self.recheck: Timer | None = None  # an urgent task waits: look again at STUCK

    # ------------------------------------------------------------------ public
    def start(self) -> None:
        """Start ``size`` workers now (forked before the service opens much)."""
        for _ in range(self.size):
            self._spawn()

    def submit(self, task: Task) -> None:
        (self.urgent if task.urgent else self.normal).append(task)
        self._dispatch()

    def fds(self) -> list[int]:
        """The pool's descriptors (closed in every other child of the service)."""
        return [fd for w in self.workers.values() for fd in (w.rfd, w.wfd, w.pidfd)]

    @property
    def busy(self) -> int:
        return sum(1 for w in self.workers.values() if w.task is not None)

    def stats(self) -> dict[str, int]:
        return {"workers": len(self.workers), "busy": self.busy,
                "queued": len(self.urgent) + len(self.normal), "killed": self.killed}

    def close(self) -> None:
        self.closed = True
        for timer in (self.retry, self.recheck):
            if timer is not None:
                timer.cancel()
        for wk in list(self.workers.values()):
            self._lost(wk, "the service is stopping")
        self._fail_queued("the service is stopping")

    # ------------------------------------------------------------------ parent side
    def _idle(self) -> list[_Worker]:
        return [w for w in self.workers.values() if w.task is None]

    def _next(self) -> Task | None:
        """The task the next idle worker takes (see the module's docstring)."""
        if self.normal and (not self.urgent or not any(
                w.task is not None and not w.task.urgent for w in self.workers.values())):
            return self.normal.popleft()
        if self.urgent:
            return self.urgent.popleft()
        return None

    def _dispatch(self) -> None:
        while (self.urgent or self.normal) and not self.closed:
            idle = self._idle()
            if not idle:
                want = len(self.workers) < self.size or (
                    self.urgent and len(self.workers) < min(self.max_size,
                                                            self.size + self._held()))
                if not want or self.retry is not None:
                    return
                if self._spawn() is None:
                    return
                continue
            task = self._next()
            if task is None:
                return
            self._send(max(idle, key=lambda w: w.items), task)  # the warmest one

    def _held(self) -> int:
        """How many workers are held by other than urgent work making progress (see the
        module's docstring): an urgent task may start as many extra workers, no more (one
        VM that stalls is not a reason for eight).  When one more could become held, look
        again then."""
        now = time.monotonic()
        held, soonest = 0, None
        for w in self.workers.values():
            if w.task is None:
                continue
            if not w.task.urgent or (w.current is not None and now - w.begun >= STUCK):
                held += 1
            else:
                left = STUCK - (now - w.begun) if w.current is not None else STUCK
                soonest = left if soonest is None else min(soonest, left)
        if soonest is not None and self.recheck is None:
            self.recheck = self.reactor.call_later(max(0.001, soonest), self._recheck)
        return held

    def _recheck(self) -> None:
        self.recheck = None
        self._dispatch()

    def _send(self, wk: _Worker, task: Task) -> None:
        data = pickle.dumps((task.kind, task.items), protocol=pickle.HIGHEST_PROTOCOL)
        wk.task, wk.left, wk.current, wk.answered = task, dict(enumerate(task.items)), None, 0
        self._arm(wk)
        try:
            # an idle worker sits in read(): the write completes however large it is
            _write_all(wk.wfd, _LEN.pack(len(data)) + data)
        except OSError as exc:
            self._lost(wk, f"its worker process died ({exc.strerror})")

    def _readable(self, wk: _Worker) -> None:
        eof = False
        while True:
            try:
                chunk = os.read(wk.rfd, 1 << 16)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                eof = True
                break
            wk.buf += chunk
        # what arrived before the end counts: a worker may answer, then leave
        while len(wk.buf) >= _HEAD.size and wk.rfd in self.workers:
            kind, idx, n = _HEAD.unpack_from(wk.buf)
            if len(wk.buf) < _HEAD.size + n:
                break
            data = bytes(wk.buf[_HEAD.size:_HEAD.size + n])
            del wk.buf[:_HEAD.size + n]
            if wk.task is None:
                continue
            if kind == _BEGIN:
                wk.current, wk.begun = idx, time.monotonic()
                self._arm(wk)
            elif kind == _END:
                self._finished(wk)
            else:
                self._answered(wk, idx, kind == _DONE, data)
        if eof:
            self._lost(wk, "its worker process died")
            return
        self._dispatch()

    def _arm(self, wk: _Worker) -> None:
        """(Re)start the deadline of what the worker does now."""
        if wk.timer is not None:
            wk.timer.cancel()
        assert wk.task is not None
        wk.timer = self.reactor.call_later(max(MIN_TIMEOUT, wk.task.timeout),
                                           lambda: self._expired(wk))

    def _answered(self, wk: _Worker, idx: int, ok: bool, data: bytes) -> None:
        task = wk.task
        assert task is not None
        wk.current = None
        wk.answered += 1
        wk.items += 1
        self._arm(wk)  # the next "begin" (or the end) is due within a deadline too
        item = wk.left.pop(idx, None)
        try:
            value = pickle.loads(data)
        except Exception as exc:
            ok, value = False, f"bad answer from a worker: {exc}"
        _call(task, item, value if ok else None, None if ok else str(value))

    def _finished(self, wk: _Worker) -> None:
        task, wk.task = wk.task, None
        if wk.timer is not None:
            wk.timer.cancel()
        wk.idle_since = time.monotonic()
        if task is not None and wk.left:  # items it never answered (cannot happen)
            for item in wk.left.values():
                _call(task, item, None, "the worker skipped it")
        wk.left = {}
        if wk.items >= MAX_ITEMS:
            self._drop(wk, kill=False)  # it reads EOF and leaves
        elif len(self.workers) > self.size:
            self.reactor.call_later(IDLE_RETIRE, self._retire)

    def _expired(self, wk: _Worker) -> None:
        if wk.task is None or wk.rfd not in self.workers:
            return
        self.killed += 1
        t = max(MIN_TIMEOUT, wk.task.timeout)
        self._lost(wk, f"timed out after {t:g}s; the VM's worker was killed and the VM "
                   "abandoned")

    def _lost(self, wk: _Worker, why: str) -> None:
        """The worker is gone or killed: the item it was on fails with ``why``; the
        items it had not begun go back to the front of their queue (a task whose
        workers die before answering anything is given up the second time)."""
        task, wk.task = wk.task, None
        self._drop(wk, kill=True)
        if task is not None:
            left = dict(wk.left)
            if wk.current is not None and wk.current in left:
                _call(task, left.pop(wk.current), None, why)
            elif left and not wk.answered:
                task.tries += 1
                if task.tries > 1:
                    for item in left.values():
                        _call(task, item, None, why)
                    left = {}
            if left:
                queue = self.urgent if task.urgent else self.normal
                queue.appendleft(Task(task.kind, list(left.values()), task.timeout,
                                      task.on_item, task.urgent, task.tries))
        self._dispatch()

    def _retire(self) -> None:
        now = time.monotonic()
        for wk in sorted(self._idle(), key=lambda w: w.idle_since):
            if len(self.workers) <= self.size:
                return
            if now - wk.idle_since >= IDLE_RETIRE - 0.01:
                self._drop(wk, kill=False)

    def _drop(self, wk: _Worker, *, kill: bool) -> None:
        if self.workers.pop(wk.rfd, None) is None:
            return
        if wk.timer is not None:
            wk.timer.cancel()
        self.reactor.remove(wk.rfd)
        for fd in (wk.rfd, wk.wfd):
            os.close(fd)
        if kill:
            for send in (lambda: os.killpg(wk.pid, signal.SIGKILL),  # with any children
                         lambda: signal.pidfd_send_signal(wk.pidfd, signal.SIGKILL)):
                try:
                    send()
                except OSError:
                    pass
        reap_later(self.reactor, wk.pid, wk.pidfd)

    def _spawn(self) -> _Worker | None:
        """A new worker, or None when none can be started now (tried again later)."""
        try:
            wk = self._fork()
        except OSError as exc:
            self.spawn_failures += 1
            log.error("cannot start a worker process: %s", exc.strerror)
            if self.spawn_failures >= SPAWN_TRIES and not self.workers:
                self.spawn_failures = 0
                self._fail_queued(f"no worker process could be started: {exc.strerror}")
            elif self.retry is None:
                self.retry = self.reactor.call_later(SPAWN_RETRY, self._retry_spawn)
            return None
        self.spawn_failures = 0
        return wk

    def _retry_spawn(self) -> None:
        self.retry = None
        self._dispatch()

    def _fail_queued(self, why: str) -> None:
        for queue in (self.urgent, self.normal):
            while queue:
                t = queue.popleft()
                for item in t.items:
                    _call(t, item, None, why)

    def _fork(self) -> _Worker:
        to_r, to_w = os.pipe2(os.O_CLOEXEC)
        from_r, from_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError:
            for fd in (to_r, to_w, from_r, from_w):
                os.close(fd)
            raise
        if pid == 0:  # the worker: never returns into the loop
            code = 0
            try:
                os.close(to_w)
                os.close(from_r)
                become_child(self.child_setup)
                for fd in self.fds():
                    _close_quietly(fd)
                _worker_main(to_r, from_w, self.tasks, self.after_task)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(to_r)
        os.close(from_w)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # just forked and killed: it goes at once
            os.close(to_w)
            os.close(from_r)
            raise
        os.set_blocking(from_r, False)
        wk = _Worker(pid, pidfd, to_w, from_r)
        self.workers[from_r] = wk
        self.reactor.add(from_r, IN, lambda _m: self._readable(wk))
        return wk


def _call(task: Task, item: Any, value: Any, err: str | None) -> None:
    try:
        task.on_item(item, value, err)
    except Exception:
        log.exception("internal error handling the answer of a %s task", task.kind)


# ---------------------------------------------------------------------- worker side
def _worker_main(rfd: int, wfd: int, tasks: dict[str, TaskFn],
                 after_task: Callable[[dict[str, Any]], None] | None = None) -> None:
    # what the service built stays untouched by the collector: no copy-on-write of
    # the inherited heap; garbage of the worker's own making is still collected
    gc.freeze()
    context: dict[str, Any] = {}
    while "retire" not in context:
        head = _read_exact(rfd, _LEN.size)
        if head is None:
            return  # the service closed our pipe: leave
        data = _read_exact(rfd, _LEN.unpack(head)[0])
        if data is None:
            return
        kind, items = pickle.loads(data)
        fn = tasks[kind]
        # one write per item: its result and the start of the next travel together
        pending = _frame(_BEGIN, 0) if items else b""
        for i, item in enumerate(items):
            _write_all(wfd, pending)
            try:
                pending = _frame(_DONE, i, fn(item, context))
            except BaseException as exc:  # the service turns it into that item's failure
                pending = _frame(_RAISED, i, f"{type(exc).__name__}: {exc}")
            if i + 1 < len(items):
                pending += _frame(_BEGIN, i + 1)
        if after_task is not None:
            try:
                after_task(context)
            except Exception as exc:
                context["retire"] = f"its check after a task failed: {exc}"
        _write_all(wfd, pending + _frame(_END, 0))
    log.warning("worker %d retires: %s", os.getpid(), context["retire"])


def _frame(kind: int, idx: int, value: Any = None) -> bytes:
    if kind in (_BEGIN, _END):
        return _HEAD.pack(kind, idx, 0)
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        kind, data = _RAISED, pickle.dumps(f"unpicklable result: {exc}")
    return _HEAD.pack(kind, idx, len(data)) + data


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
