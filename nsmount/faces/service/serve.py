"""The service itself: events in, batches of the one per-VM pipeline out.

* a mount VMs must see appears on the host (:mod:`.mountwatch`) -> every VM, once the
  events have been quiet for ``debounce_ms`` (at most :data:`MAX_DELAY` after the
  first);
* a device node a VM's spec names appears, goes or changes (:mod:`.uevents`) -> that
  VM;
* a new VM (launch record, libvirt state file, hook request) -> that VM; an exited VM
  is forgotten with its record and lock (:mod:`.lifecycle`);
* socket requests (:mod:`.server`) -> their own job each.

Every VM of a batch, and every hook or repair request, is one task for the warm
worker processes of :mod:`.pool` (the one per-VM pipeline, :mod:`.tasks`): the loop
never blocks on a VM, each VM has its deadline, one frozen VM never holds up the
others.  At most one event batch runs at a time; events that arrive meanwhile are
collected for the next one.  Device requests run in a forked job (:mod:`.jobs`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ... import __version__ as VERSION
from ...errors import DeadlineError, NsmountError
from ...model.display import escape_name
from ...state.record import open_subdir, state_dir
from ...pipeline.outcome import Outcome, Report, report_dict
from ..reconnect import Candidate
from . import config as configmod
from . import jobs
from .pool import Pool, Task
from .tasks import TASKS, VmTask, after_task
from .client import socket_path
from .config import Config, ConfigError
from .devgate import DeviceGate
from .lifecycle import DirWatch, Registry, Vm
from .loop import IN, Reactor, Timer
from .metrics import Metrics
from .mountwatch import MountKey, MountWatch, relevant_mounts
from .protocol import FAILED, TIMEOUT, Request, error, ok
from .server import Conn, Server

log = logging.getLogger("nsmount.service")

#: an event batch starts at most this long after its first event
MAX_DELAY = 0.25
#: request jobs running at once (more wait in a queue)
MAX_JOBS = 8
#: how often a VM that failed in a batch is tried again before the service waits for
#: the next event that concerns it
RETRIES = 3
#: a batch is cut into this many tasks per worker: a worker that is done early takes
#: the next one, so the batch ends at most one chunk after the first worker is idle
#: (4: a chunk of 13 VMs at 100 VMs and 2 workers, ~15 ms of work)
CHUNKS_PER_WORKER = 4
#: slack on top of the per-VM deadline before a job is killed
JOB_SLACK = 5.0


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the service holds a pidfd per VM (1000
    VMs do not fit in the usual soft limit of 1024)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-files limit from %d: %s", soft, exc)


#: what a VM's copy of a host device node is made from: (st_mode, st_rdev, uid, gid),
#: None when the host has no node there
NodeState = tuple[int, int, int, int] | None
UNKNOWN_NODE: NodeState = (-1, -1, -1, -1)


def host_node(path: str) -> NodeState:
    """The host's node at ``path`` (the host's /dev: trusted; no link followed);
    :data:`UNKNOWN_NODE` when it cannot be looked at (its events always count)."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return UNKNOWN_NODE
    return (st.st_mode, st.st_rdev, st.st_uid, st.st_gid)


def sd_notify(msg: str) -> None:
    """systemd's readiness protocol: one datagram to $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


@dataclass
class _Waiting:
    """A reconnect/started/repair request on its way to the pool."""

    conn: Conn
    req: Request
    cand: Candidate
    known: bool  # tracked by the service when it came
    t0: float


def _log_request(conn: Conn, req: Request, pid: int, value: Any, err: str | None,
                 seconds: float, note: str = "") -> None:
    """One line per reconnect/started/repair request: who asked (the hook's shell path
    sends ``id`` ``libvirt-hook``, its Python fallback ``libvirt-hook-py``), for which VM,
    and how it ended; the admin's (and the tests') proof of which path a hook took."""
    if err is not None:
        how = f"error: {escape_name(err)}"
    else:
        how = ", ".join(f"{o.get('status')}"
                        + (f" ({len(o.get('actions', []))} action(s))"
                           if o.get("status") == "repaired" else "")
                        for o in value.get("vms", [])) or "no VM"
    name = req.domain if req.domain is not None else next(
        (o.get("name") for o in (value or {}).get("vms", []) if o.get("name")), None)
    log.info("request %s %s (pid %d) from uid %d pid %d id %s: %s%s in %.3fs", req.op,
             escape_name(name) if name is not None else "-", pid, conn.uid,
             conn.peer_pid, escape_name(str(req.id)) if req.id is not None else "-", how,
             note, seconds)


#: seconds between two writes of the metrics file at the most (see _write_metrics)
METRICS_EVERY = 0.1

#: a ``started`` request is answered from a check of the VM that began at most this
#: long before, with no event for the VM since (see Service.fresh_check)
FRESH = 2.0


class Service:
    def __init__(self, cfg: Config, *, config_arg: str | None = None,
                 sdir: str | None = None, lvdir: str | None = None,
                 metrics_file: str | None = None, timeout: float | None = None,
                 workers: int | None = None, policy: str | None = None) -> None:
        self.cfg = cfg
        self.config_arg = config_arg
        self.policy_arg = policy
        self.gate = DeviceGate(configmod.policy_path(cfg, policy))
        self.sdir = state_dir(sdir or os.environ.get("NSMOUNT_STATE_DIR") or cfg.state_dir)
        self.lvdir = lvdir or os.environ.get("NSMOUNT_LIBVIRT_STATE_DIR") \
            or cfg.libvirt_state_dir
        self.metrics_arg = metrics_file
        self.timeout_arg = timeout
        self.workers_arg = workers
        self.metrics = Metrics()
        self.reactor = Reactor()
        self.started = time.monotonic()
        self.known_mounts: frozenset[MountKey] = frozenset()
        # event batches
        self.dirty: dict[int, float] = {}  # pid -> monotonic time of its first event
        self.retries: dict[int, int] = {}  # pid -> failed batches in a row (RETRIES)
        self.batch: Batch | None = None
        self.batch_no = 0
        self.pool: Pool | None = None
        self.requests = 0  # socket requests being worked on by the pool
        #: reconnect-type requests read in this turn of the loop (_flush_requests)
        self.waiting: list[_Waiting] = []
        self.batch_timer: Timer | None = None
        self.batch_first: float | None = None
        self.mount_timer: Timer | None = None
        self.mount_first: float | None = None
        self.rescan_timer: Timer | None = None
        # request jobs
        self.jobs: dict[int, jobs.Job] = {}
        self.queue: deque[Callable[[], None]] = deque()
        self._dev_index: dict[str, set[int]] | None = None
        #: host node (type+mode, rdev, owner) of each device path at its last uevent that
        #: was acted on (None: absent); bounded by the paths the VMs name
        self._node_seen: dict[str, NodeState] = {}
        self.uevents: Any = None
        # the metrics file: when it was last written, the write that waits (if any)
        self.metrics_at = -METRICS_EVERY
        self.metrics_timer: Timer | None = None
        self.stopping = False

    # ------------------------------------------------------------------ settings
    @property
    def timeout(self) -> float:
        return self.timeout_arg or self.cfg.timeout

    @property
    def workers(self) -> int:
        return self.workers_arg or self.cfg.jobs or os.cpu_count() or 1

    @property
    def debounce(self) -> float:
        return self.cfg.debounce_ms / 1000.0

    @property
    def metrics_file(self) -> str | None:
        return self.metrics_arg or self.cfg.metrics_file

    # ------------------------------------------------------------------ start/stop
    def start(self) -> None:
        raise_fd_limit()
        self.gate.load(strict=True)  # a bad policy at start-up is an error (exit 3)
        # the workers first, while the service holds no sockets or watches to inherit
        self.pool = Pool(self.reactor, TASKS, size=self.workers,
                         max_size=self.workers + MAX_JOBS, child_setup=self._in_worker,
                         after_task=after_task)
        self.pool.start()
        for _ in range(self.workers):
            self.pool.submit(Task("warm-up", [None], self.timeout, lambda *_a: None))
        os.close(open_subdir("vms", self.sdir))  # exists (0700) before it is watched
        self.registry = Registry(self.reactor, sdir=self.sdir, lvdir=self.lvdir,
                                 on_exit=self._vm_exited)
        from ...state.sources import libvirt_state_dir

        self.dirwatch = DirWatch(self.reactor, [os.path.join(self.sdir, "vms"),
                                                libvirt_state_dir(self.lvdir)],
                                 self._state_changed)
        self.mountwatch = MountWatch(self.reactor, self._mount_event)
        try:
            from .uevents import UeventWatch

            self.uevents = UeventWatch(self.reactor, self._device_event, self._uevent_overflow)
        except Exception as exc:
            log.warning("device events unavailable: %s", exc)
        self.server = Server(self.reactor, socket_path(self.sdir),
                             gid=configmod.resolve_gid(self.cfg.socket_group),
                             dispatch=self._request,
                             public=self.gate.policy.grants_anything)
        self._signals()
        self.known_mounts = relevant_mounts(self.cfg.mounts)
        new = self.registry.rescan(scan=True)
        self._note_nodes(new)
        self._mark([vm.pid for vm in new], time.monotonic())
        self._write_metrics()
        log.info("serving %d VM(s) on %s (mount events: %s, device events: %s)",
                 len(self.registry.vms), self.server.path, self.mountwatch.method,
                 "uevent" if self.uevents else "none")
        sd_notify(f"READY=1\nSTATUS=tracking {len(self.registry.vms)} VMs\nMAINPID={os.getpid()}")

    def run(self) -> None:
        try:
            self.reactor.run()
        finally:
            self.close()

    def close(self) -> None:
        sd_notify("STOPPING=1")
        self.stopping = True  # from now on the metrics file is written at once
        for j in list(self.jobs.values()):
            j.finish(timed_out=True)  # killed, never waited for
        for part in ("pool", "server", "mountwatch", "uevents", "dirwatch", "registry"):
            obj = getattr(self, part, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    log.exception("closing %s", part)
        signal.set_wakeup_fd(-1)
        if self.metrics_timer is not None:  # what changed last (closing included) is in it
            self.metrics_timer.cancel()
            self._flush_metrics()
        self.reactor.close()

    def _in_worker(self) -> None:
        """In a new worker process: the service's descriptors are not its to hold (a
        client connection kept open there would never see its end)."""
        fds = [*self.reactor.handlers, self.reactor.ep.fileno(), *getattr(self, "_sigpipe", ()),
               *(self.pool.fds() if self.pool is not None else ())]
        server = getattr(self, "server", None)
        if server is not None:  # fds clients sent, device fds not yet sent to a client
            fds += [fd for c in server.conns.values() for fd in c.held_fds()]
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _signals(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sigpipe = (r, w)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_a: None)  # the byte on the wakeup fd does the work
        self.reactor.add(r, IN, self._on_signal)

    def _on_signal(self, _mask: int) -> None:
        try:
            data = os.read(self._sigpipe[0], 64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("signal %d: stopping", signum)
                self.reactor.stop()
            elif signum == signal.SIGHUP:
                self.reload()

    def reload(self) -> None:
        try:
            cfg = configmod.load(self.config_arg)
        except ConfigError as exc:
            log.error("%s; keeping the last good configuration", exc.oneline())
            cfg = self.cfg
        self.gate.load(configmod.policy_path(cfg, self.policy_arg))
        try:
            self.server.set_public(self.gate.policy.grants_anything)
        except OSError as exc:
            log.error("socket mode: %s", exc)
        if cfg is self.cfg:
            return
        old, self.cfg = self.cfg, cfg
        log.info("configuration reloaded from %s", cfg.path or "(defaults)")
        if (cfg.state_dir, cfg.libvirt_state_dir) != (old.state_dir, old.libvirt_state_dir):
            log.warning("state_dir/libvirt_state_dir changes take effect at restart")
        if cfg.socket_group != old.socket_group:
            try:
                self.server.set_group(configmod.resolve_gid(cfg.socket_group))
            except (ConfigError, OSError) as exc:
                log.error("socket group: %s", exc)
        new = self.registry.rescan(scan=True)
        self._dev_index = None
        self._note_nodes(new)
        self.known_mounts = relevant_mounts(cfg.mounts)
        if (cfg.mounts, cfg.default_devices) != (old.mounts, old.default_devices):
            self._mark(list(self.registry.vms), time.monotonic())
        elif new:  # VMs the rescan found are checked once, as at start-up
            self._mark([vm.pid for vm in new], time.monotonic())

    # ------------------------------------------------------------------ events
    def _mount_event(self, kind: str) -> None:
        self.metrics.event(f"mount-{kind}")
        now = time.monotonic()
        if self.mount_first is None:
            self.mount_first = now
        if self.mount_timer is not None:
            self.mount_timer.cancel()
        due = min(self.debounce, self.mount_first + MAX_DELAY - now)
        self.mount_timer = self.reactor.call_later(due, self._mount_check)

    def _mount_check(self) -> None:
        first, self.mount_first, self.mount_timer = self.mount_first, None, None
        now = relevant_mounts(self.cfg.mounts)
        appeared = now - self.known_mounts
        gone = self.known_mounts - now
        self.known_mounts = now
        for mp, fs, dev, _uid in sorted(gone):
            log.info("host mount gone: %s (%s %s)", escape_name(mp), fs, dev)
        if appeared:
            for mp, fs, dev, _uid in sorted(appeared):
                log.info("host mount appeared: %s (%s %s)", escape_name(mp), fs, dev)
            # these events were debounced already: the batch starts at once
            self._mark(list(self.registry.vms), first or time.monotonic(), settled=True)

    def _device_event(self, path: str, action: str) -> None:
        """A uevent for ``path``: the VMs that name it are repaired when the host node
        differs from what it was at the last event that reached them.  Most uevents
        change no node -- /dev/kvm sends ``change`` whenever any KVM guest on the host
        starts or stops, and ``echo change > .../uevent`` storms send thousands -- and
        must not turn into a repair of every VM each time."""
        self.metrics.event("uevent")
        if self._dev_index is None:
            idx: dict[str, set[int]] = {}
            for vm in self.registry.vms.values():
                for p in vm.device_paths():
                    idx.setdefault(p, set()).add(vm.pid)
            self._dev_index = idx
            self._node_seen = {p: st for p, st in self._node_seen.items() if p in idx}
        pids = self._dev_index.get(path)
        if not pids:
            return
        node = host_node(path)
        if node != UNKNOWN_NODE and path in self._node_seen and self._node_seen[path] == node:
            self.metrics.event("uevent-unchanged")
            return
        self._node_seen[path] = node
        log.info("device %s: %s; repairing %d VM(s)", escape_name(path), action, len(pids))
        self._mark(sorted(pids), time.monotonic())

    def _note_nodes(self, vms: list[Vm]) -> None:
        """The host nodes of new VMs' device paths as they are now, before the VMs'
        first run: a later uevent that changes none of them is nothing new for them.
        (A path first met in a uevent counts as changed: its state before is unknown.)"""
        for vm in vms:
            for p in vm.device_paths():
                self._node_seen.setdefault(p, host_node(p))

    def _uevent_overflow(self) -> None:
        self.metrics.event("uevent-overflow")
        self._dev_index = None
        self._node_seen.clear()  # events were lost: the next ones all count
        self._mark([vm.pid for vm in self.registry.vms.values() if vm.device_paths()],
                   time.monotonic())

    def _state_changed(self) -> None:
        self.metrics.event("state-dir")
        if self.rescan_timer is None:
            self.rescan_timer = self.reactor.call_later(min(self.debounce, 0.02), self._rescan)

    def _rescan(self) -> None:
        self.rescan_timer = None
        new = self.registry.rescan()
        self._dev_index = None
        self._note_nodes(new)
        if new:
            self._mark([vm.pid for vm in new], time.monotonic())

    def _vm_exited(self, vm: Vm) -> None:
        self.metrics.vm_exits += 1
        self.dirty.pop(vm.pid, None)
        self._dev_index = None
        self._write_metrics()

    # ------------------------------------------------------------------ batches
    def _mark(self, pids: list[int], t_event: float, *, settled: bool = False) -> None:
        """These VMs need the pipeline: in the next batch, once events have been quiet
        for ``debounce_ms`` (``settled``: they were debounced already, start now)."""
        if not pids:
            return
        now = time.monotonic()
        for pid in pids:
            vm = self.registry.vms.get(pid)
            if vm is not None:
                self.dirty[pid] = min(self.dirty.get(pid, t_event), t_event)
                vm.event_at = now
        if self.batch is not None:
            return  # the next batch starts when this one is done
        if self.batch_first is None:
            self.batch_first = now
        if self.batch_timer is not None:
            self.batch_timer.cancel()
        due = 0.0 if settled else min(self.debounce, self.batch_first + MAX_DELAY - now)
        self.batch_timer = self.reactor.call_later(due, self._run_batch)

    def _run_batch(self) -> None:
        self.batch_timer, self.batch_first = None, None
        todo = {pid: t for pid, t in self.dirty.items() if pid in self.registry.vms}
        self.dirty.clear()
        if not todo or self.pool is None:
            return
        cands = [replace(self.registry.vms[pid].cand) for pid in sorted(todo)]
        self.batch_no += 1
        batch = self.batch = Batch(todo, len(cands))
        log.debug("batch of %d VM(s)", len(cands))
        items = [VmTask(c, self.sdir, self.lvdir, self.timeout, self.cfg.mounts,
                        self.cfg.default_devices, batch=self.batch_no, bulk=len(cands) > 1)
                 for c in cands]

        def answered(item: VmTask, value: Any, err: str | None) -> None:
            batch.add(item.cand, value, err)
            if batch.left == 0:
                self._batch_done(batch)

        # a few chunks per worker: few hand-overs, and a worker that meets slow VMs
        # leaves the rest of the batch to the others
        size = -(-len(items) // (CHUNKS_PER_WORKER * self.pool.size))
        for k in range(0, len(items), size):
            self.pool.submit(Task("vm", items[k:k + size], self.timeout, answered))

    def _batch_done(self, batch: Batch) -> None:
        now = time.monotonic()  # the last VM's answer came: every VM is done
        self.batch = None
        self.metrics.batches += 1
        report = batch.report()
        self._account(report, batch.todo, t_run=batch.started)
        log.info("batch of %d VM(s) done in %.3fs, %.3fs after its first event (VMs took "
                 "%.3fs in all; accounting %.3fs)", batch.size, now - batch.started,
                 now - min(batch.todo.values(), default=batch.started),
                 sum(o["seconds"] for o in batch.outcomes), time.monotonic() - now)
        self._retry_failed(report, batch.todo)
        self._write_metrics()
        if self.dirty:
            self._mark(list(self.dirty), min(self.dirty.values()))

    def _retry_failed(self, report: dict[str, Any], todo: dict[int, float]) -> None:
        """A VM that failed in a batch (often the host changed under it: a mount that
        was unmounted between reading the table and cloning it) is tried again with the
        next batch, at most RETRIES times in a row: no later event may come to redo it,
        and a VM that always fails must not keep the service busy."""
        for o in report.get("vms", []):
            pid = o.get("pid", -1)
            if o.get("status") != "failed":
                self.retries.pop(pid, None)
                continue
            n = self.retries.get(pid, 0) + 1
            if n <= RETRIES and pid in self.registry.vms:
                self.retries[pid] = n
                self.dirty.setdefault(pid, todo.get(pid, time.monotonic()))
            else:
                self.retries.pop(pid, None)

    def _account(self, report: dict[str, Any], t_events: dict[int, float] | None = None,
                 *, t_run: float | None = None, log_repaired: bool = True) -> None:
        """Metrics, log lines and each VM's state from a report of a run that began at
        ``t_run`` (a VM found or left right by it is clean from then on)."""
        now = time.monotonic()
        for o in report.get("vms", []):
            st = o.get("status")
            self.metrics.drift += len(o.get("drift", []))
            if st == "repaired":
                self.metrics.repairs += 1
            elif st == "failed":
                self.metrics.failures += 1
                log.warning("%s (pid %s): %s", escape_name(o.get("name") or "?"), o.get("pid"),
                            escape_name(o.get("error", "")))
            if st == "repaired" and log_repaired:
                log.info("%s (pid %s): repaired (%d action(s))", escape_name(o.get("name") or "?"),
                         o.get("pid"), len(o.get("actions", [])))
            vm = self.registry.vms.get(o.get("pid", -1))
            if vm is not None:
                vm.note(o)
                vm.clean_from = t_run if st in ("ok", "repaired") else None
            if t_events and o.get("pid") in t_events and st in ("repaired", "ok"):
                self.metrics.latency(now - t_events[o["pid"]])

    # ------------------------------------------------------------------ jobs
    def _start_job(self, kind: str, fn: Callable[[], Any], timeout: float,
                   on_done: Callable[[Any, str | None], None]) -> jobs.Job:
        job = jobs.start(kind, fn, timeout=timeout, on_done=on_done,
                         child_setup=self._in_worker)

        def readable(_mask: int) -> None:
            while True:
                try:
                    chunk = os.read(job.rfd, 1 << 16)
                except BlockingIOError:
                    return
                if not chunk:
                    break
                job.buf += chunk
            self.reactor.remove(job.rfd)
            timer.cancel()
            job.finish()

        def expired() -> None:
            log.error("%s job (pid %d) passed its deadline of %.0fs: killed", kind, job.pid,
                      timeout)
            self.reactor.remove(job.rfd)
            if not job.finish(timed_out=True):
                jobs.reap_later(self.reactor, job.pid)

        timer = self.reactor.call_later(timeout, expired)
        self.reactor.add(job.rfd, IN, readable)
        return job

    def _request_job(self, kind: str, fn: Callable[[], Any], timeout: float,
                     on_done: Callable[[Any, str | None], None]) -> None:
        def run() -> None:
            def finished(value: Any, err: str | None) -> None:
                self.jobs.pop(job.pid, None)
                try:
                    on_done(value, err)
                finally:
                    if self.queue and len(self.jobs) < MAX_JOBS:
                        self.queue.popleft()()

            job = self._start_job(kind, fn, timeout, finished)
            self.jobs[job.pid] = job

        if len(self.jobs) < MAX_JOBS:
            run()
        else:
            self.queue.append(run)

    # ------------------------------------------------------------------ requests
    def _request(self, conn: Conn, req: Request, pidfd: int = -1) -> None:
        self.metrics.request(req.op)
        if req.op == "open-device":
            self.gate.open_device(conn, req, pidfd)
            return
        if req.op == "device-bind":
            self.gate.device_bind(conn, req, pidfd, self._request_job)
            return
        try:
            if req.op == "list":
                conn.done(ok(req.id, {"vms": self.list_vms()}))
            elif req.op == "status":
                conn.done(ok(req.id, self.status()))
            elif req.op in ("reconnect", "started", "repair"):
                self._req_reconnect(conn, req)
            else:
                self._req_device(conn, req)
        except NsmountError as exc:
            conn.done(error(req.id, FAILED, exc.oneline()))

    def _pid_of(self, req: Request) -> tuple[int, str | None]:
        if req.pid is not None:
            return req.pid, None
        from ...state.sources import resolve_target

        return resolve_target(str(req.domain), lvdir=self.lvdir)

    def fresh_check(self, vm: Vm | None, req: Request) -> float | None:
        """How long ago (seconds) a run that found or left ``vm`` right began, when a
        ``started`` request may be answered from it: libvirt runs the hook's ``started``
        right after the QEMU process appeared, and by then the service has mostly
        checked the new VM already (libvirt's state directory told it).  Only without
        a domain XML (the hook's shell path), within FRESH seconds, with no event for
        the VM since that run began and none pending.  Else None: run the pipeline."""
        if req.op != "started" or req.xml is not None or vm is None \
                or vm.clean_from is None or vm.pid in self.dirty:
            return None
        age = time.monotonic() - vm.clean_from
        return age if vm.clean_from >= vm.event_at and age < FRESH else None

    def _req_reconnect(self, conn: Conn, req: Request) -> None:
        pid, domain = self._pid_of(req)
        vm = self.registry.vms.get(pid)
        age = self.fresh_check(vm, req)
        if vm is not None and age is not None:
            out = Outcome(pid, vm.name, vm.source, extra={"checked_ago": round(age, 4)})
            value = Report([out]).to_dict()
            _log_request(conn, req, pid, value, None, 0.0,
                         note=f" (checked {age * 1000:.0f} ms before)")
            conn.done(ok(req.id, value))
            return
        if vm is not None:
            cand = replace(vm.cand, name=vm.cand.name or domain)
        else:
            origin = "libvirt-hook" if req.op in ("reconnect", "started") else "request"
            cand = Candidate(pid, origin, domain)
        self.requests += 1
        if not self.waiting:  # the requests read in this turn of the loop go together
            self.reactor.call_later(0, self._flush_requests)
        self.waiting.append(_Waiting(conn, req, cand, vm is not None, time.monotonic()))

    def _flush_requests(self) -> None:
        """The reconnect/started/repair requests of one turn of the loop as urgent pool
        tasks.  One request is one task of one VM, as before.  More (a libvirt daemon
        restart sends one per domain, all at once) share one host reading (a batch
        number) and are cut in chunks like an event batch, so a burst costs a few
        hand-overs instead of one per request; each request is still answered, with a
        report of its own VM alone, as soon as its VM is done."""
        ws, self.waiting = self.waiting, []
        if not ws or self.pool is None:
            return
        by_pid: dict[int, list[_Waiting]] = {}
        for w in ws:
            by_pid.setdefault(w.cand.pid, []).append(w)
        batch: int | None = None
        if len(by_pid) > 1:
            self.batch_no += 1
            batch = self.batch_no
            log.info("%d request(s) for %d VM(s) handed to the workers together", len(ws),
                     len(by_pid))
        items = []
        for group in by_pid.values():
            w = group[0]
            xml = next((x.req.xml for x in group if x.req.xml is not None), None)
            items.append(VmTask(w.cand, self.sdir, self.lvdir,
                                max(x.req.timeout for x in group), self.cfg.mounts,
                                self.cfg.default_devices, xml=xml, batch=batch,
                                bulk=batch is not None))

        def done(item: VmTask, value: Any, err: str | None) -> None:
            group = by_pid[item.cand.pid]
            self.requests -= len(group)
            now = time.monotonic()
            t0 = min(w.t0 for w in group)
            if err is not None:
                for w in group:
                    _log_request(w.conn, w.req, item.cand.pid, None, err, now - w.t0)
                    w.conn.done(error(w.req.id, TIMEOUT if err.startswith("timed out")
                                      else FAILED, err))
                return
            outs = [value] if value is not None else []
            if any(not w.known for w in group) and any(o["status"] != "failed" for o in outs):
                # pinned and checked by the pipeline: from now on the service keeps it
                self.registry.adopt(replace(group[0].cand))
                self._dev_index = None
            out = report_dict(outs, now - t0)
            # each request's own log line says how its VM ended
            self._account(out, {item.cand.pid: t0}, t_run=t0, log_repaired=False)
            self._write_metrics()
            for w in group:
                _log_request(w.conn, w.req, item.cand.pid, out, None, now - w.t0)
                w.conn.done(ok(w.req.id, out))

        size = max(1, -(-len(items) // (CHUNKS_PER_WORKER * self.pool.size)))
        for k in range(0, len(items), size):
            self.pool.submit(Task("vm", items[k:k + size], max(i.timeout for i in items),
                                  done, urgent=True))

    def _req_device(self, conn: Conn, req: Request) -> None:
        from ..repair import device_add, device_remove

        target = req.target
        paths = list(req.paths)
        fn = device_add if req.op == "device-add" else device_remove
        sdir, lvdir, timeout = self.sdir, self.lvdir, req.timeout

        def work() -> dict[str, Any]:
            try:
                return fn(target, paths, sdir=sdir, lvdir=lvdir, timeout=timeout).to_dict()
            except NsmountError as exc:
                return {"status": "failed", "error": exc.oneline(), "error_code": exc.exit_code}

        def done(value: Any, err: str | None) -> None:
            if err is not None:
                conn.done(error(req.id, TIMEOUT if err.startswith("timed out") else FAILED,
                                err))
                return
            self._account({"vms": [value]})
            conn.done(ok(req.id, value))

        self._request_job(req.op, work, timeout + JOB_SLACK, done)

    # ------------------------------------------------------------------ reports
    def list_vms(self) -> list[dict[str, Any]]:
        vms = sorted(self.registry.vms.values(), key=lambda v: (v.name or "", v.pid))
        return [v.to_dict() for v in vms]

    def status(self) -> dict[str, Any]:
        return {"version": VERSION, "pid": os.getpid(),
                "uptime": round(time.monotonic() - self.started, 3),
                "vms": len(self.registry.vms), "state_dir": self.sdir,
                "config": self.cfg.path, "policy": self.gate.policy.path,
                "policy_rules": len(self.gate.policy.rules), "mount_events": self.mountwatch.method,
                "device_events": bool(self.uevents),
                "batch_running": self.batch is not None,
                "jobs": len(self.jobs) + self.requests,
                "workers": self.pool.stats() if self.pool else {},
                "queued": len(self.queue), "pending_vms": len(self.dirty),
                "problems": dict(self.registry.problems),
                "counters": {"drift": self.metrics.drift, "repairs": self.metrics.repairs,
                             "failures": self.metrics.failures,
                             "batches": self.metrics.batches,
                             "vm_exits": self.metrics.vm_exits,
                             "events": dict(self.metrics.events),
                             "requests": dict(self.metrics.requests)}}

    def _write_metrics(self) -> None:
        """The metrics file, after something changed: at once, or when a write was less
        than METRICS_EVERY seconds ago, then (a write is ~0.2 ms, a libvirt daemon
        restart answers one request per domain: one write each would have doubled the
        loop's time per request)."""
        if not self.metrics_file or self.metrics_timer is not None:
            return
        wait = self.metrics_at + METRICS_EVERY - time.monotonic()
        if wait > 0 and not self.stopping:
            self.metrics_timer = self.reactor.call_later(wait, self._flush_metrics)
        else:
            self._flush_metrics()

    def _flush_metrics(self) -> None:
        self.metrics_timer = None
        self.metrics_at = time.monotonic()
        registry = getattr(self, "registry", None)
        if registry is not None:
            self.metrics.vms = len(registry.vms)
        path = self.metrics_file
        if path:
            try:
                self.metrics.write(path)
            except OSError as exc:
                log.warning("cannot write metrics to %s: %s", path, exc.strerror)


class Batch:
    """One event batch in flight: its VMs' outcomes as they come back."""

    def __init__(self, todo: dict[int, float], size: int) -> None:
        self.todo = todo  # pid -> monotonic time of its first event
        self.size = size
        self.left = size
        self.started = time.monotonic()
        self.outcomes: list[dict[str, Any]] = []  # in their dict form (see tasks)

    def add(self, cand: Candidate, value: dict[str, Any] | None, err: str | None) -> None:
        self.left -= 1
        if err is not None:
            code = DeadlineError.exit_code if err.startswith("timed out") else 2
            self.outcomes.append(Outcome(cand.pid, cand.name, cand.origin, status="failed",
                                         error=err, error_code=code).to_dict())
        elif value is not None:  # None: a recorded VM that exited, forgotten
            self.outcomes.append(value)

    def report(self) -> dict[str, Any]:
        outs = sorted(self.outcomes, key=lambda o: (o["name"] or "", o["pid"]))
        return report_dict(outs, time.monotonic() - self.started)
