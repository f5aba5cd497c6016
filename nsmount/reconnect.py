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
from dataclasses import dataclass, field
from typing import Any

from .errors import NsmountError, SpecError, from_oserror
from .hoststate import HostState
from .kernel import consts as C
from .kernel import syscalls
from .kernel.nsenter import NamespacePool
from .locks import vm_lock
from .model import record
from .model.spec import VmSpec
from .session import Outcome, VmSession, ensure_host_hugepage_dirs, host_ns_fd
from .sources import libvirt_state_dir, looks_like_qemu, read_pidfile
from .target import Target, ns_id


@dataclass
class Candidate:
    """A VM found by discovery, before it is pinned."""

    pid: int
    origin: str  # record | libvirt | scan
    name: str | None = None
    starttime: int | None = None
    spec: VmSpec | None = None
    error: str = ""


def discover(*, sdir: str | None = None, lvdir: str | None = None,
             scan: bool = True) -> list[Candidate]:
    found: dict[int, Candidate] = {}
    bad: list[Candidate] = []
    for rec in record.scan(sdir):
        found.setdefault(rec.pid, Candidate(rec.pid, "record", rec.spec.name, rec.starttime,
                                            rec.spec))
    d = libvirt_state_dir(lvdir)
    try:
        entries = set(os.listdir(d))
        # driver.pid is the QEMU driver's own lock file (libvirtd's pid), not a domain
        names = sorted(n[:-4] for n in entries if n.endswith(".pid")
                       and not (n == "driver.pid" and "driver.xml" not in entries))
    except FileNotFoundError:
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
            from .sources import libvirt_status

            st = libvirt_status(name, lvdir)
            if st is not None:
                xpid, spec = st
                if xpid != pid:
                    err = f"status XML names pid {xpid} but the pid file says {pid}"
        except SpecError as exc:
            err = exc.oneline()
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
    """QEMU processes in a mount namespace other than ours (psutil scan)."""
    import psutil

    me = ns_id("self")
    for p in psutil.process_iter(["pid", "name"]):
        name = p.info.get("name") or ""
        if not (name.startswith("qemu-system-") or name in ("qemu-kvm", "kvm")):
            continue
        try:
            with open(f"/proc/{p.pid}/cmdline", "rb") as fh:
                if not looks_like_qemu(fh.read()):
                    continue
            if ns_id(p.pid) == me:
                continue
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


#: below this many VMs per worker a fork costs more than it saves
MIN_VMS_PER_WORKER = 50


def reconnect(*, candidates: list[Candidate] | None = None, dry_run: bool = False,
              jobs: int = 1, sdir: str | None = None, lvdir: str | None = None,
              scan: bool = True, progress: Callable[[int, int, int], None] | None = None
              ) -> Report:
    """Reconnect all (or the given) VMs; returns a per-VM report.  Library entry point
    for VM-manager daemons.

    ``jobs`` > 1 shards the VMs over that many forked worker processes (Python threads
    would only contend for the GIL); each worker enters namespaces from one thread of
    its own.  The library default is 1, in-process, which is safe to call from a
    multithreaded daemon; the CLI uses one worker per CPU.
    """
    t0 = time.perf_counter()
    if candidates is None:
        candidates = discover(sdir=sdir, lvdir=lvdir, scan=scan)
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

    args = (host, dry_run, sdir, lvdir, bulk)
    if workers == 1:
        _run_shard(good, *args, emit=emit)
    else:
        _run_forked([good[i::workers] for i in range(workers)], args, emit)
    rep.outcomes.sort(key=lambda o: (o.name or "", o.pid))
    rep.seconds = time.perf_counter() - t0
    return rep


def _run_shard(cands: list[Candidate], host: HostState, dry_run: bool, sdir: str | None,
               lvdir: str | None, bulk: bool, *, emit: Callable[[Outcome], None]) -> None:
    """Reconnect ``cands`` one after the other from one namespace thread."""
    hfd = host_ns_fd()
    try:
        with NamespacePool(1) as pool:
            for c in cands:
                emit(_process(c, host, hfd, pool, dry_run, sdir, lvdir, bulk))
    finally:
        os.close(hfd)


def _process(c: Candidate, host: HostState, hfd: int, pool: NamespacePool, dry_run: bool,
             sdir: str | None, lvdir: str | None, bulk: bool) -> Outcome:
    try:
        t = Target.pin(c.pid, expect_starttime=c.starttime, name=c.name)
    except NsmountError as exc:
        return _failed(c, exc.oneline(), exc.exit_code)
    try:
        spec = c.spec
        if spec is None:
            from .sources import spec_for

            spec = spec_for(t, domain=c.name, lvdir=lvdir, sdir=sdir)
        sess = VmSession(t, spec, host, all_hugetlbfs=True, bulk=bulk)
        if not dry_run:
            sess.skipped_host = ensure_host_hugepage_dirs(sess.desired)  # type: ignore[attr-defined]
        return pool.submit(_one, sess, hfd, dry_run, sdir).result()
    except NsmountError as exc:
        return _failed(c, exc.oneline(), exc.exit_code)
    finally:
        t.close()


def _run_forked(shards: list[list[Candidate]], args: tuple[Any, ...],
                emit: Callable[[Outcome], None]) -> None:
    """One forked worker per shard; outcomes come back pickled, length-prefixed."""
    import pickle
    import selectors
    import struct

    from . import executor

    children: dict[int, int] = {}
    sel = selectors.DefaultSelector()
    for shard in shards:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(r)
                executor.WORKER_OF = os.getppid()

                def send(o: Outcome, w: int = w) -> None:
                    data = pickle.dumps(o)
                    os.write(w, struct.pack("=I", len(data)))
                    mv = memoryview(data)
                    while mv:
                        mv = mv[os.write(w, mv):]

                _run_shard(shard, *args, emit=send)
            except BaseException:  # a worker must never return into the caller
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        children[r] = pid
        sel.register(r, selectors.EVENT_READ, bytearray())
    try:
        while sel.get_map():
            for key, _ in sel.select():
                buf: bytearray = key.data
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    continue
                buf += chunk
                while len(buf) >= 4:
                    (n,) = struct.unpack("=I", buf[:4])
                    if len(buf) < 4 + n:
                        break
                    emit(pickle.loads(bytes(buf[4:4 + n])))
                    del buf[:4 + n]
    finally:
        for pid in children.values():
            os.waitpid(pid, 0)


def _one(sess: VmSession, hfd: int, dry_run: bool, sdir: str | None) -> Outcome:
    """Runs in a pool worker: back to the host namespace (a reused worker may sit in
    the previous VM's), take the VM's lock there, then work() enters the VM."""
    t = sess.target
    try:
        syscalls.setns(hfd, C.CLONE_NEWNS)
        with vm_lock(t.pid, t.starttime, sdir=sdir) as waited:
            out = sess.work(hfd, dry_run=dry_run)
            if waited:
                out.warnings.append("busy, waited for another nsmount")
    except NsmountError as exc:
        out = Outcome(t.pid, sess.spec.name, sess.spec.source, status="failed",
                      error=exc.oneline(), error_code=exc.exit_code)
    except OSError as exc:  # e.g. a planted lock file: this VM fails, the others go on
        err = from_oserror(exc, "lock")
        out = Outcome(t.pid, sess.spec.name, sess.spec.source, status="failed",
                      error=err.oneline(), error_code=err.exit_code)
    for e in getattr(sess, "skipped_host", []):
        out.warnings.append(f"host side: {e}")
    return out


def reconnect_one(target: str | int, **kw: Any) -> Report:
    from .sources import resolve_target

    pid, domain = resolve_target(str(target), lvdir=kw.get("lvdir"))
    return reconnect(candidates=[Candidate(pid, "target", domain)], **kw)
