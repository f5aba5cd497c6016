"""VM lifecycle: which VMs the service keeps right, and when they go away.

VMs are learnt from nsmount's launch records (``$STATE/vms/``, watched with
inotify), from libvirt's state directory (watched too), from the hook's requests and,
at start-up and on SIGHUP, from a process-table scan -- all through
:func:`nsmount.reconnect.discover`, the same discovery ``nsmount reconnect`` uses.
Each VM is pinned with a pidfd (and its start time) as soon as it is adopted; when
the pidfd becomes readable the VM has exited: its launch record and lock are
dropped and it is forgotten.
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ...errors import NsmountError, SpecError
from ...kernel import notify
from ...state.locks import drop_lock
from ...state import record
from ...model.display import escape_name
from ..reconnect import Candidate, discover
from ...state.target import starttime
from .loop import IN, Reactor

log = logging.getLogger("nsmount.service")

#: problems with state files remembered (to log each once)
MAX_PROBLEMS = 1024


@dataclass
class Vm:
    cand: Candidate
    pidfd: int
    starttime: int
    adopted: float = field(default_factory=time.time)
    status: str = "new"  # new | ok | repaired | failed
    last_run: float | None = None
    last_repair: float | None = None
    drift: list[str] = field(default_factory=list)
    error: str = ""
    runs: int = 0
    #: monotonic start of the last run that found or left the VM right (None after a
    #: failure), and of the last event that concerned it: see Service.fresh_check
    clean_from: float | None = None
    event_at: float = 0.0

    @property
    def pid(self) -> int:
        return self.cand.pid

    @property
    def name(self) -> str | None:
        return self.cand.name

    @property
    def source(self) -> str:
        return self.cand.spec.source if self.cand.spec is not None else self.cand.origin

    def device_paths(self) -> set[str]:
        """Every /dev path the VM's spec names (optional ones too), with the host
        paths their symlinks resolve to (a uevent names the node, not the link)."""
        spec = self.cand.spec
        if spec is None:
            return set()
        out: set[str] = set()
        for req in spec.all_device_requests():
            out.add(req.path)
            try:
                real = os.path.realpath(req.path)  # the host's /dev: trusted
            except OSError:
                continue
            if real != req.path:
                out.add(real)
        return out

    def note(self, outcome: dict[str, Any]) -> None:
        now = time.time()
        self.runs += 1
        self.last_run = now
        self.status = str(outcome.get("status", "failed"))
        self.drift = [str(d.get("kind")) for d in outcome.get("drift", [])
                      if isinstance(d, dict)]
        self.error = str(outcome.get("error", ""))
        if self.status == "repaired":
            self.last_repair = now
        if outcome.get("name") and self.cand.name is None:
            self.cand.name = str(outcome["name"])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pid": self.pid, "name": self.name, "source": self.source,
                             "origin": self.cand.origin, "status": self.status,
                             "last_run": self.last_run, "last_repair": self.last_repair,
                             "drift": self.drift, "runs": self.runs}
        if self.error:
            d["error"] = self.error
        return d


class Registry:
    def __init__(self, reactor: Reactor, *, sdir: str | None, lvdir: str | None,
                 on_exit: Callable[[Vm], None]) -> None:
        self.reactor = reactor
        self.sdir = sdir
        self.lvdir = lvdir
        self.on_exit = on_exit
        self.vms: dict[int, Vm] = {}
        self.problems: dict[str, str] = {}

    def rescan(self, *, scan: bool = False) -> list[Vm]:
        """Adopt every VM discovery finds that is not tracked yet (records of VMs that
        exited are dropped by discovery); refresh the spec of known ones from their
        (possibly rewritten) launch record.  Returns the new ones."""
        new: list[Vm] = []
        problems: dict[str, str] = {}
        for c in discover(sdir=self.sdir, lvdir=self.lvdir, scan=scan):
            if c.error:
                key = f"{c.origin}:{c.name or c.pid}"
                problems[key] = c.error
                if self.problems.get(key) != c.error:
                    log.warning("%s %s: %s", c.origin, escape_name(c.name or c.pid),
                                escape_name(c.error))
                continue
            vm = self.vms.get(c.pid)
            if vm is None:
                adopted = self.adopt(c)
                if adopted is not None:
                    new.append(adopted)
            elif c.recorded and c.starttime == vm.starttime:
                if not vm.cand.recorded or vm.cand.spec != c.spec:
                    name = vm.cand.name
                    vm.cand = c
                    vm.cand.name = vm.cand.name or name
            elif c.spec is not None and vm.cand.spec is None:
                vm.cand = replace(vm.cand, spec=c.spec, name=vm.cand.name or c.name)
        self.problems = dict(list(problems.items())[:MAX_PROBLEMS])
        return new

    def adopt(self, c: Candidate) -> Vm | None:
        """Pin ``c`` with a pidfd; None when it is gone or its pid was reused."""
        if c.pid in self.vms:
            return self.vms[c.pid]
        try:
            pidfd = os.pidfd_open(c.pid)
        except OSError:
            return None
        try:
            st = starttime(c.pid)
            if c.starttime is not None and st != c.starttime:
                raise NsmountError("pid reused")
            p = select.poll()
            p.register(pidfd, select.POLLIN)
            if p.poll(0):
                raise NsmountError("exited")
        except (NsmountError, OSError, ValueError, IndexError):
            os.close(pidfd)
            return None
        c.starttime = st  # from now on the pin checks the start time too
        vm = Vm(c, pidfd, st)
        self.vms[c.pid] = vm
        pid = c.pid
        self.reactor.add(pidfd, IN, lambda _m: self.exited(pid))
        log.info("tracking VM %s (pid %d, from %s)", escape_name(c.name or "?"), c.pid,
                 c.origin)
        return vm

    def exited(self, pid: int) -> None:
        vm = self.vms.pop(pid, None)
        if vm is None:
            return
        self.reactor.remove(vm.pidfd)
        os.close(vm.pidfd)
        forget(pid, vm.starttime, self.sdir)
        log.info("VM %s (pid %d) exited; record and lock dropped", escape_name(vm.name or "?"),
                 pid)
        self.on_exit(vm)

    def close(self) -> None:
        for vm in self.vms.values():
            self.reactor.remove(vm.pidfd)
            os.close(vm.pidfd)
        self.vms.clear()


def forget(pid: int, started: int, sdir: str | None) -> None:
    """Drop the launch record of an exited VM (only if it is that VM's: a new process
    may already have reused the pid) and its lock file."""
    try:
        rec = record.read(pid, sdir)
    except SpecError:
        rec = None
    if rec is not None and rec.starttime == started:
        record.remove(pid, sdir)
    drop_lock(pid, started, sdir=sdir)


class DirWatch:
    """inotify on directories that may not exist yet: until one does, its nearest
    existing ancestor is watched for it to appear.  ``on_change()`` on any entry
    created, renamed into, written or removed."""

    MASK = (notify.IN_CREATE | notify.IN_MOVED_TO | notify.IN_CLOSE_WRITE | notify.IN_DELETE
            | notify.IN_MOVED_FROM | notify.IN_DELETE_SELF | notify.IN_MOVE_SELF
            | notify.IN_ONLYDIR)

    def __init__(self, reactor: Reactor, paths: list[str],
                 on_change: Callable[[], None]) -> None:
        self.reactor = reactor
        self.paths = paths
        self.on_change = on_change
        self.fd = notify.inotify_fd()
        self.wds: dict[int, str] = {}
        self._arm()
        reactor.add(self.fd, IN, self._read)

    def _arm(self) -> None:
        """Watch each wanted directory, or its nearest existing ancestor (adding a watch
        twice returns the same descriptor: nothing to remove first)."""
        for p in self.paths:
            q = p
            while True:
                try:
                    self.wds[notify.add_watch(self.fd, q, self.MASK)] = q
                    break
                except OSError:
                    if q == "/":
                        break
                    q = os.path.dirname(q)

    def _leads_to_wanted(self, watched: str, name: str) -> bool:
        child = os.path.join(watched, name)
        return any(p == child or p.startswith(child + "/") for p in self.paths)

    def _read(self, _mask: int) -> None:
        rearm = changed = False
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not buf:
                break
            for ev in notify.parse_inotify(buf):
                watched = self.wds.get(ev.wd)
                if ev.mask & notify.IN_Q_OVERFLOW:
                    rearm = changed = True
                elif ev.mask & notify.IN_IGNORED:
                    self.wds.pop(ev.wd, None)
                elif watched is None:
                    continue
                elif watched in self.paths:
                    changed = True
                    if ev.mask & (notify.IN_DELETE_SELF | notify.IN_MOVE_SELF):
                        rearm = True
                elif self._leads_to_wanted(watched, ev.name):
                    rearm = changed = True  # a wanted directory (or its parent) appeared
        if rearm:
            self._arm()
        if changed:
            self.on_change()

    def close(self) -> None:
        self.reactor.remove(self.fd)
        os.close(self.fd)
