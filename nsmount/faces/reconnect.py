"""Face 3: reconnect every running VM after a VM-manager daemon restart.

Discovery (nsmount records, libvirt's state dir, a process-table scan), then, per
VM and in parallel: pin by pidfd, make sure every host hugetlbfs mount (and every
configured mount) is visible inside with the per-domain hugepage directory, and
repair the rest of the namespace.  One broken VM never stops the others; every
VM gets a result line (ok / repaired / failed with the reason).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import NsmountError, SpecError
from ..model.spec import VmSpec
from ..pipeline.outcome import Outcome, Report
from ..pipeline.vm import GONE, Job, run_many
from ..pipeline.workers import DEFAULT_TIMEOUT
from ..state import record
from ..state.locks import drop_lock
from ..state.sources import (
    libvirt_state_dir,
    libvirt_status,
    looks_like_qemu,
    read_pidfile,
    resolve_target,
)
from ..state.target import SELF_MNTNS, owned_by_us, read_cmdline, running


@dataclass
class Candidate:
    """A VM found by discovery, before it is pinned."""

    pid: int
    origin: str  # record | libvirt | scan
    name: str | None = None
    starttime: int | None = None
    spec: VmSpec | None = None
    error: str = ""
    #: from nsmount's launch record: the namespace and /dev tmpfs it built
    mntns: tuple[int, int] | None = None
    dev: int | None = None
    recorded: bool = False


def _drop_stale(pid: int, started: int | None, sdir: str | None) -> None:
    """Forget a VM that exited: its launch record and its lock file."""
    record.remove(pid, sdir)
    if started is not None:
        drop_lock(pid, started, sdir=sdir)


def discover(*, sdir: str | None = None, lvdir: str | None = None,
             scan: bool = True, dry_run: bool = False,
             check_alive: bool = True) -> list[Candidate]:
    """Every VM to reconnect.  Records of VMs that exited are dropped (kept with
    ``dry_run``) and never reported; a bad state file is that VM's failure, with the
    reason, never the run's.  ``check_alive=False`` leaves the liveness of recorded
    VMs to the pipeline (which pins them anyway, in parallel workers)."""
    found: dict[int, Candidate] = {}
    bad: list[Candidate] = []
    for pid, rec in record.scan(sdir):
        if isinstance(rec, SpecError):
            if not running(pid, None):
                if not dry_run:
                    record.remove(pid, sdir)
                continue
            bad.append(Candidate(pid, "record", error=rec.oneline()))
            continue
        if check_alive and not running(pid, rec.starttime):
            if not dry_run:
                _drop_stale(pid, rec.starttime, sdir)
            continue
        found.setdefault(pid, Candidate(pid, "record", rec.spec.name, rec.starttime, rec.spec,
                                        mntns=rec.mntns, dev=rec.dev, recorded=True))
    d = libvirt_state_dir(lvdir)
    try:
        entries = set(os.listdir(d))
        # driver.pid is the QEMU driver's own lock file (libvirtd's pid), not a domain
        names = sorted(n[:-4] for n in entries if n.endswith(".pid")
                       and not (n == "driver.pid" and "driver.xml" not in entries))
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for name in names:
        try:
            pid = read_pidfile(os.path.join(d, f"{name}.pid"))
        except NsmountError as exc:
            bad.append(Candidate(-1, "libvirt", name, error=exc.oneline()))
            continue
        spec = None
        err = ""
        try:
            st = libvirt_status(name, lvdir)
            if st is not None:
                xpid, spec = st
                if xpid != pid:
                    err = f"status XML names pid {xpid} but the pid file says {pid}"
        except NsmountError as exc:
            err = exc.oneline()
        except Exception as exc:  # a parser bug on hostile input: this VM fails, not the run
            err = f"{name}.xml: cannot parse: {type(exc).__name__}: {exc}"
        if err:
            bad.append(Candidate(pid, "libvirt", name, error=err))
            continue
        if pid in found:
            if found[pid].name is None:
                found[pid].name = name
            continue
        found[pid] = Candidate(pid, "libvirt", name, spec=spec)
    if scan:
        for c in _scan_processes():
            found.setdefault(c.pid, c)
    return list(found.values()) + bad


def _scan_processes() -> Iterable[Candidate]:
    """QEMU processes in a mount namespace other than ours that our own user namespace
    owns (psutil scan).  A process in a namespace it made itself (``unshare -Urm``) is
    never adopted: whatever it calls itself, nsmount cannot trust anything in there."""
    import psutil

    for p in psutil.process_iter(["pid", "name"]):
        name = p.info.get("name") or ""
        if not (name.startswith("qemu-system-") or name in ("qemu-kvm", "kvm")):
            continue
        try:
            if not looks_like_qemu(read_cmdline(p.pid)):
                continue
            nsfd = os.open(f"/proc/{p.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(nsfd)
                if (st.st_dev, st.st_ino) == SELF_MNTNS or not owned_by_us(nsfd):
                    continue
            finally:
                os.close(nsfd)
        except (OSError, NsmountError):  # gone meanwhile, or not ours to read
            continue
        yield Candidate(p.pid, "scan")


#: below this many VMs per worker one more fork costs more than it saves
MIN_VMS_PER_WORKER = 50


def unusable(c: Candidate) -> Outcome:
    """The failed outcome of a candidate discovery could not make sense of."""
    return Outcome(c.pid, c.name, c.origin, status="failed", error=c.error, error_code=2)


def forget_if_gone(o: Outcome, *, dry_run: bool, sdir: str | None) -> bool:
    """True for the outcome of a recorded VM that exited (:data:`GONE`): it is
    forgotten (record and lock dropped), neither a success nor a failure."""
    if o.status != GONE:
        return False
    if not dry_run:
        _drop_stale(o.pid, o.extra.get("starttime"), sdir)
    return True


def job_for(c: Candidate, *, dry_run: bool = False, bulk: bool = False,
            sdir: str | None = None, lvdir: str | None = None,
            timeout: float = DEFAULT_TIMEOUT,
            adjust_spec: Callable[[VmSpec], VmSpec] | None = None) -> Job:
    """The pipeline job that reconnects one discovered VM: everything repaired, every
    hugetlbfs mount visible with its per-domain dir, on the host side too."""
    return Job(c.pid, c.name, c.origin, c.starttime, c.spec,
               (c.mntns, c.dev) if c.recorded else None, dry_run=dry_run,
               all_hugetlbfs=True, bulk=bulk, state_dir=sdir, libvirt_state_dir=lvdir,
               timeout=timeout, adjust=adjust_spec)


def reconnect(*, candidates: list[Candidate] | None = None, dry_run: bool = False,
              jobs: int = 1, sdir: str | None = None, lvdir: str | None = None,
              scan: bool = True, timeout: float = DEFAULT_TIMEOUT,
              progress: Callable[[int, int, int], None] | None = None,
              adjust_spec: Callable[[VmSpec], VmSpec] | None = None,
              inline: bool = False) -> Report:
    """Reconnect all (or the given) VMs; returns a per-VM report.  Library entry point
    for VM-manager daemons: "the pipeline for many VMs".

    The VMs are worked on in forked worker processes (``jobs`` at most, one per 50
    VMs), each VM under a deadline of ``timeout`` seconds: a VM that blocks is
    abandoned (its worker killed) and reported failed, the others go on.
    ``adjust_spec`` (the service's host configuration: mounts every VM must see,
    default devices) is applied to each VM's spec once it is known.  ``inline``: no
    worker processes (see :func:`nsmount.pipeline.vm.run_many`).
    """
    t0 = time.perf_counter()
    if candidates is None:
        candidates = discover(sdir=sdir, lvdir=lvdir, scan=scan, dry_run=dry_run,
                              check_alive=False)
    rep = Report()
    bulk = len(candidates) > 1
    todo = []
    for c in candidates:
        if c.error:
            rep.outcomes.append(unusable(c))
        else:
            todo.append(job_for(c, dry_run=dry_run, bulk=bulk, sdir=sdir, lvdir=lvdir,
                                timeout=timeout, adjust_spec=adjust_spec))
    workers = max(1, min(jobs or 1, len(todo) // MIN_VMS_PER_WORKER or 1))
    if os.environ.get("NSMOUNT_CRASH_AFTER"):
        workers = 1  # crash injection counts steps in one process

    def emit(o: Outcome) -> None:
        if forget_if_gone(o, dry_run=dry_run, sdir=sdir):
            return
        rep.outcomes.append(o)
        if progress:
            progress(len(rep.outcomes), len(candidates),
                     sum(x.status == "failed" for x in rep.outcomes))

    run_many(todo, workers=workers, on_outcome=emit, inline=inline)
    rep.outcomes.sort(key=lambda o: (o.name or "", o.pid))
    rep.seconds = time.perf_counter() - t0
    return rep


def reconnect_one(target: str | int, **kw: Any) -> Report:
    pid, domain = resolve_target(str(target), lvdir=kw.get("lvdir"))
    return reconnect(candidates=[Candidate(pid, "target", domain)], **kw)
