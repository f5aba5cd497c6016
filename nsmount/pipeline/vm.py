"""The one per-VM pipeline every face calls.

    pin target -> choose spec -> lock -> observe (inside) -> plan -> apply -> outcome

A face describes what it wants as a :class:`Job` and hands it to :func:`run_single`
(one VM: errors are raised, for a command's exit code) or :func:`run_many` (reconnect,
the hook, the service: every VM gets an outcome, a failure is that VM's).  Both run the
same :func:`run` in forked workers (:mod:`.workers`) under the job's deadline, so a VM
that blocks is abandoned without stopping anything else.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..engine.hoststate import HostState
from ..errors import DeadlineError, NoSuchProcessError, NsmountError, UnsafePathError
from ..kernel import consts as C
from ..kernel import syscalls
from ..model.paths import canonical, is_strictly_within
from ..model.spec import VmSpec
from ..state.locks import vm_lock
from ..state.sources import check_record, spec_for, update_record
from ..state.target import Target, running
from .outcome import Outcome, failure
from .session import VmSession, host_ns_fd
from .workers import DEFAULT_TIMEOUT, run_all, run_one

MODES = ("inspect", "repair", "add", "remove")
#: the status of an outcome for a VM that exited before it could be worked on: the
#: caller forgets it (drops its record), it is neither a success nor a failure
GONE = "gone"


@dataclass(frozen=True)
class Job:
    """What to do with one VM."""

    pid: int
    name: str | None = None  # libvirt domain name, when the VM was named that way
    origin: str = "target"  # who asked: target | record | libvirt | scan | libvirt-hook
    starttime: int | None = None  # from discovery: a pid reused since is refused
    spec: VmSpec | None = None  # given (admin, hook XML, discovery); else looked up
    #: (mount namespace, /dev st_dev) from the launch record discovery read
    recorded: tuple[tuple[int, int] | None, int | None] | None = None
    mode: str = "repair"
    dry_run: bool = False
    rebuild: bool = False
    paths: tuple[str, ...] = ()  # device add / remove
    all_hugetlbfs: bool = False  # per-domain dirs in every hugetlbfs mount, host side too
    bulk: bool = False  # one of many: share host lookups
    state_dir: str | None = None
    libvirt_state_dir: str | None = None
    #: seconds for this VM (lock wait included); None: no deadline, in-process (see
    #: :func:`run_single`)
    timeout: float | None = DEFAULT_TIMEOUT
    #: applied to the VM's spec once it is known (the service's host configuration:
    #: mounts every VM must see, default devices)
    adjust: Callable[[VmSpec], VmSpec] | None = None

    def failed(self, msg: str, code: int = 2) -> Outcome:
        return Outcome(self.pid, self.name, self.origin, status="failed", error=msg,
                       error_code=code)


def hotplug_paths(paths: Sequence[str]) -> tuple[str, ...]:
    """Canonical device paths strictly under /dev (UnsafePathError otherwise)."""
    out = []
    for p in paths:
        c = canonical(p, what="device path")
        if not is_strictly_within(c, "/dev"):
            raise UnsafePathError(f"{p} is not under /dev")
        out.append(c)
    return tuple(out)


def run(job: Job, host: HostState, host_ns: int) -> Outcome:
    """The pipeline for one VM, in the calling worker (which must own its fs_struct).
    Raises NsmountError when the VM cannot even be worked on (gone, refused, no spec,
    locked); problems found while working are in the outcome."""
    syscalls.setns(host_ns, C.CLONE_NEWNS)  # /proc and the state dirs are the host's
    deadline = time.monotonic() + (job.timeout or DEFAULT_TIMEOUT)
    with Target.pin(job.pid, expect_starttime=job.starttime, name=job.name) as t:
        if job.recorded is not None:
            t.expect_namespace(*job.recorded)
        else:
            check_record(t, job.state_dir)
        spec = job.spec if job.spec is not None else spec_for(
            t, domain=job.name, lvdir=job.libvirt_state_dir, sdir=job.state_dir)
        if job.adjust is not None:
            spec = job.adjust(spec)
        if t.name is None and spec.name:
            t.name = spec.name
        sess = VmSession(t, _work_spec(job, spec, host), host,
                         all_hugetlbfs=job.all_hugetlbfs, bulk=job.bulk)
        with vm_lock(t.pid, t.starttime, sdir=job.state_dir,
                     timeout=max(0.1, deadline - time.monotonic())) as waited:
            t.check_alive()  # it may have exited while we waited for the lock
            out = sess.work(host_ns, dry_run=job.dry_run, mode=job.mode,
                            rebuild=job.rebuild, remove=job.paths)
            if waited:
                out.warnings.append("busy, waited for another nsmount")
            _remember(job, t, spec, out, sess.new_dev)
        return out


def _work_spec(job: Job, spec: VmSpec, host: HostState) -> VmSpec:
    """The spec the session plans from: the VM's own, or just the hot-added devices."""
    if job.mode == "add":
        return VmSpec(name=spec.name, domain_id=spec.domain_id, default_devices=(),
                      source=spec.source).with_devices(job.paths)
    if job.mode == "remove":
        defaults = {canonical(d) for d in spec.default_devices}
        subs = [h.path for h in host.submounts]
        for p in job.paths:
            if p in defaults:
                raise UnsafePathError(f"{p} is a default node; refusing to remove it")
            if any(is_strictly_within(p, s) or p == s for s in subs):
                raise UnsafePathError(f"{p} is a mount point or inside a submount; refusing")
        return VmSpec(name=spec.name, domain_id=spec.domain_id, default_devices=(),
                      source=spec.source)
    return spec


def _remember(job: Job, t: Target, spec: VmSpec, out: Outcome, new_dev: int | None) -> None:
    """What changed for good goes into the launch record: hot-plugged devices, and the
    /dev a rebuild swapped in (the VM's own from now on)."""
    if job.dry_run or out.status == "failed":
        return
    if job.mode == "remove" and out.status == "repaired" and all(
            r.ok and r.note == "already absent" for r in out.results):
        out.status = "ok"  # nothing was there to remove: nothing changed
    if job.mode == "add":
        update_record(t, spec.with_devices(job.paths), job.state_dir)
    elif job.mode == "remove":
        update_record(t, spec.without_devices(job.paths), job.state_dir)
    elif new_dev is not None and t.recorded_dev is not None:
        update_record(t, spec, job.state_dir, dev=new_dev)


def run_safe(job: Job, host: HostState, host_ns: int) -> Outcome:
    """:func:`run`, with every error turned into this VM's failed outcome; a VM known
    only from its launch record that is no longer running is :data:`GONE`."""
    try:
        return run(job, host, host_ns)
    except NoSuchProcessError as exc:
        if job.recorded is not None and not running(job.pid, job.starttime):
            return Outcome(job.pid, job.name, job.origin, status=GONE,
                           extra={"starttime": job.starttime})
        return failure(job.failed(""), exc)
    except (NsmountError, OSError) as exc:
        return failure(job.failed(""), exc)



def run_single(job: Job, host: HostState | None = None) -> Outcome:
    """One VM in a forked worker under ``job.timeout``: its outcome; NsmountError when
    it cannot be worked on; DeadlineError when it blocked.

    ``job.timeout=None`` trades the deadline for speed (no fork, about 2-4 ms less):
    the work runs in a thread of this process, and a VM that blocks it blocks the
    caller.  Only for callers that trust the VM not to (or have a deadline of their
    own); every command of the CLI has a deadline."""
    host = host or HostState.read()
    hfd = host_ns_fd()
    try:
        if job.timeout is None:
            return _in_thread(lambda: run(job, host, hfd))
        return run_one(lambda: run(job, host, hfd), timeout=job.timeout)
    finally:
        os.close(hfd)


def _in_thread(fn: Callable[[], Outcome]) -> Outcome:
    """``fn()`` in a new thread that owns its fs_struct (``setns(CLONE_NEWNS)`` is
    refused in a thread that shares it), so this process's own root never moves."""
    import threading

    box: dict[str, object] = {}

    def main() -> None:
        try:
            syscalls.unshare(C.CLONE_FS)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=main, name="nsmount-vm")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def run_many(jobs: Sequence[Job], *, workers: int, on_outcome: Callable[[Outcome], None],
             host: HostState | None = None, inline: bool = False) -> None:
    """Every job in ``workers`` forked processes, each VM under its own deadline; one
    outcome per job, failures included, in the order they finish.

    ``inline``: in this process, one after another, no worker -- only for a caller that
    is itself a disposable single-threaded process under a deadline of its own (the
    service's job children), where a second fork would only cost time."""
    host = host or HostState.read()
    hfd = host_ns_fd()
    timeout = max((j.timeout or DEFAULT_TIMEOUT for j in jobs), default=DEFAULT_TIMEOUT)
    try:
        if inline:
            for j in jobs:
                on_outcome(run_safe(j, host, hfd))
            return
        run_all(list(jobs), lambda j: run_safe(j, host, hfd), workers=workers,
                timeout=timeout, on_result=lambda _j, o: on_outcome(o),
                on_error=lambda j, exc: on_outcome(failure(j.failed(""), exc)),
                on_lost=lambda j, why: on_outcome(j.failed(why, DeadlineError.exit_code)))
    finally:
        os.close(hfd)


__all__ = ["MODES", "Job", "hotplug_paths", "run", "run_many", "run_safe",
           "run_single"]
