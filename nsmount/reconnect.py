"""Face 3: reconnect every running VM after a VM-manager daemon restart.

Discovery (nsmount records, libvirt's state dir, a process-table scan), then, per
VM and in parallel: pin by pidfd, make sure every host hugetlbfs mount (and every
configured mount) is visible inside with the per-domain hugepage directory, and
repair the rest of the namespace.  One broken VM never stops the others; every
VM gets a result line (ok / repaired / failed with the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import DeadlineError, NsmountError, SpecError
from .hoststate import HostState
from .kernel import consts as C
from .kernel import syscalls
from .locks import drop_lock, vm_lock
from .model import record
from .model.display import escape_name, safe_line
from .model.spec import VmSpec
from .session import Outcome, VmSession, ensure_host_hugepage_dirs, failure, host_ns_fd
from .sources import (
    check_record,
    libvirt_state_dir,
    libvirt_status,
    looks_like_qemu,
    read_pidfile,
    resolve_target,
    spec_for,
)
from .target import SELF_MNTNS, Target, owned_by_us, starttime
from .worker import DEFAULT_TIMEOUT, run_all


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


def _running(pid: int, started: int | None) -> bool:
    try:
        return started is None or starttime(pid) == started
    except (NsmountError, OSError, ValueError, IndexError):
        return False


def _drop_stale(pid: int, started: int | None, sdir: str | None) -> None:
    """Forget a VM that exited: its launch record and its lock file."""
    record.remove(pid, sdir)
    if started is not None:
        drop_lock(pid, started, sdir=sdir)


def discover(*, sdir: str | None = None, lvdir: str | None = None,
             scan: bool = True, dry_run: bool = False) -> list[Candidate]:
    """Every VM to reconnect.  Records of VMs that exited are dropped (kept with
    ``dry_run``) and never reported; a bad state file is that VM's failure, with the
    reason, never the run's."""
    found: dict[int, Candidate] = {}
    bad: list[Candidate] = []
    for pid, rec in record.scan(sdir):
        if isinstance(rec, SpecError):
            if not _running(pid, None):
                if not dry_run:
                    record.remove(pid, sdir)
                continue
            bad.append(Candidate(pid, "record", error=rec.oneline()))
            continue
        if not _running(pid, rec.starttime):
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
            with open(f"/proc/{p.pid}/cmdline", "rb") as fh:
                if not looks_like_qemu(fh.read(1 << 20)):
                    continue
            nsfd = os.open(f"/proc/{p.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            try:
                st = os.fstat(nsfd)
                if (st.st_dev, st.st_ino) == SELF_MNTNS or not owned_by_us(nsfd):
                    continue
            finally:
                os.close(nsfd)
        except OSError:
            continue
        yield Candidate(p.pid, "scan")


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, int]:
        s = {"total": len(self.outcomes), "ok": 0, "repaired": 0, "failed": 0,
             "would-repair": 0}
        for o in self.outcomes:
            s[o.status] = s.get(o.status, 0) + 1
        return s

    @property
    def exit_code(self) -> int:
        s = self.summary()
        if s["failed"]:
            return 2
        return 1 if s["repaired"] else 0

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "seconds": round(self.seconds, 4),
                "vms": [o.to_dict() for o in self.outcomes]}


def _failed(c: Candidate, msg: str, code: int = 2) -> Outcome:
    return Outcome(c.pid, c.name, c.origin, status="failed", error=msg, error_code=code)


#: below this many VMs per worker one more fork costs more than it saves
MIN_VMS_PER_WORKER = 50


def reconnect(*, candidates: list[Candidate] | None = None, dry_run: bool = False,
              jobs: int = 1, sdir: str | None = None, lvdir: str | None = None,
              scan: bool = True, timeout: float = DEFAULT_TIMEOUT,
              progress: Callable[[int, int, int], None] | None = None,
              adjust_spec: Callable[[VmSpec], VmSpec] | None = None) -> Report:
    """Reconnect all (or the given) VMs; returns a per-VM report.  Library entry point
    for VM-manager daemons.

    The VMs are worked on in forked worker processes (``jobs`` at most, one per 50
    VMs), each VM under a deadline of ``timeout`` seconds: a VM that blocks is
    abandoned (its worker killed) and reported failed, the others go on.
    ``adjust_spec`` (the service's host configuration: mounts every VM must see,
    default devices) is applied to each VM's spec once it is known.
    """
    t0 = time.perf_counter()
    if candidates is None:
        candidates = discover(sdir=sdir, lvdir=lvdir, scan=scan, dry_run=dry_run)
    host = HostState.read()
    rep = Report()
    good = []
    for c in candidates:
        if c.error:
            rep.outcomes.append(_failed(c, c.error))
        else:
            good.append(c)
    bulk = len(candidates) > 1
    workers = max(1, min(jobs or 1, len(good) // MIN_VMS_PER_WORKER or 1))
    if os.environ.get("NSMOUNT_CRASH_AFTER"):
        workers = 1  # crash injection counts steps in one process

    def emit(o: Outcome) -> None:
        rep.outcomes.append(o)
        if progress:
            progress(len(rep.outcomes), len(candidates),
                     sum(x.status == "failed" for x in rep.outcomes))

    hfd = host_ns_fd()
    try:
        run_all(good, lambda c: _process(c, host, hfd, dry_run, sdir, lvdir, bulk, timeout,
                                         adjust_spec),
                workers=workers, timeout=timeout,
                on_result=lambda _c, o: emit(o),
                on_error=lambda c, exc: emit(failure(_failed(c, ""), exc)),
                on_lost=lambda c, why: emit(_failed(c, why, DeadlineError.exit_code)))
    finally:
        os.close(hfd)
    rep.outcomes.sort(key=lambda o: (o.name or "", o.pid))
    rep.seconds = time.perf_counter() - t0
    return rep


def _process(c: Candidate, host: HostState, hfd: int, dry_run: bool, sdir: str | None,
             lvdir: str | None, bulk: bool, timeout: float,
             adjust_spec: Callable[[VmSpec], VmSpec] | None = None) -> Outcome:
    """One VM, in a worker process: pin, check, lock, then the session does the rest."""
    syscalls.setns(hfd, C.CLONE_NEWNS)  # /proc and the state dirs are the host's
    deadline = time.monotonic() + timeout
    try:
        t = Target.pin(c.pid, expect_starttime=c.starttime, name=c.name)
    except NsmountError as exc:
        return _failed(c, exc.oneline(), exc.exit_code)
    out = _failed(c, "")
    try:
        if c.recorded:
            t.expect_namespace(c.mntns, c.dev)
        else:
            check_record(t, sdir)
        spec = c.spec if c.spec is not None else spec_for(t, domain=c.name, lvdir=lvdir,
                                                          sdir=sdir)
        if adjust_spec is not None:
            spec = adjust_spec(spec)
        out = Outcome(t.pid, spec.name, spec.source)
        sess = VmSession(t, spec, host, all_hugetlbfs=True, bulk=bulk)
        host_errs = [] if dry_run else ensure_host_hugepage_dirs(sess.desired)
        with vm_lock(t.pid, t.starttime, sdir=sdir,
                     timeout=max(0.1, deadline - time.monotonic())) as waited:
            out = sess.work(hfd, dry_run=dry_run)
            if waited:
                out.warnings.append("busy, waited for another nsmount")
        out.warnings += [f"host side: {e}" for e in host_errs]
        return out
    except (NsmountError, OSError) as exc:
        return failure(out, exc, t)
    finally:
        t.close()


def reconnect_one(target: str | int, **kw: Any) -> Report:
    pid, domain = resolve_target(str(target), lvdir=kw.get("lvdir"))
    return reconnect(candidates=[Candidate(pid, "target", domain)], **kw)


# ------------------------------------------------------------------- CLI
def _progress_printer() -> Callable[[int, int, int], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int, failed: int) -> None:
        if total >= 20 and (done == total or done % 10 == 0):
            sys.stderr.write(f"\rreconnect: {done}/{total} VMs, {failed} failed")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    return show


def cmd_reconnect(args: argparse.Namespace) -> int:
    kw: dict[str, Any] = {"dry_run": args.dry_run, "jobs": args.jobs or os.cpu_count() or 1,
                          "sdir": args.state_dir, "timeout": args.timeout,
                          "lvdir": args.libvirt_state_dir, "progress": _progress_printer()}
    if args.target:
        rep = reconnect_one(args.target, **kw)
    else:
        rep = reconnect(scan=not args.no_scan, **kw)
    if args.json:
        print(json.dumps(rep.to_dict(), indent=1, default=str))
    else:
        for o in rep.outcomes:
            who = (f"{escape_name(o.name or 'vm')} (pid {o.pid})" if o.pid > 0
                   else escape_name(o.name or "?"))
            what = o.error if o.status == "failed" else (
                f"{len(o.actions)} action(s)" if o.actions else "nothing to do")
            print(safe_line(f"{o.status:<12} {who}: {what}"))
            for w in o.warnings:
                print(safe_line(f"{'':12} warning: {w}"))
        s = rep.summary()
        print(f"{s['total']} VM(s): {s['ok']} ok, {s['repaired']} repaired, "
              f"{s['would-repair']} would repair, {s['failed']} failed "
              f"in {rep.seconds:.3f}s")
    return rep.exit_code
