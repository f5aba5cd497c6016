"""What the service's warm workers (:mod:`.pool`) do: the one per-VM pipeline.

A task names one VM (a :class:`~nsmount.faces.reconnect.Candidate` the service
tracks, or one a hook request named) and the settings to run it with.  It runs in a
worker process under the task's deadline, never in the event loop.  The VMs of one
batch share one reading of the host's mount table (keyed by the batch number); a
request reads it afresh.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

# imported here, by the service before it forks its workers, though the pipeline
# imports them only when it needs them: otherwise every worker (and every extra one)
# pays for the same imports on its first libvirt VM, and keeps its own copy
from ...engine import hostfacts as _hostfacts  # noqa: F401
from ...kernel import userns as _userns  # noqa: F401
from ...model import qemu_cmdline as _qemu_cmdline  # noqa: F401
from ...state import libvirtspec as _libvirtspec  # noqa: F401
from ...state import sysfs as _sysfs  # noqa: F401
from ...engine.hoststate import HostState
from ...errors import NsmountError
from ...kernel import consts as C
from ...kernel import fsops, syscalls
from ...model.spec import VmSpec
from ...pipeline.outcome import Outcome
from ...pipeline.session import host_ns_fd
from ...pipeline.vm import run_safe
from ..reconnect import Candidate, forget_if_gone, job_for, unusable


@dataclass(frozen=True)
class VmTask:
    cand: Candidate
    sdir: str | None
    lvdir: str | None
    timeout: float
    #: the host configuration: mounts every VM must see, default devices
    mounts: tuple[str, ...] = ()
    default_devices: tuple[str, ...] = ()
    #: the batch this VM belongs to (None: a request of its own)
    batch: int | None = None
    bulk: bool = False
    #: a libvirt hook request's domain XML (parsed here, never in the event loop)
    xml: str | None = None


def spec_adjuster(mounts: tuple[str, ...], devices: tuple[str, ...]
                  ) -> Callable[[VmSpec], VmSpec] | None:
    """The host configuration applied to every VM's spec."""
    if not mounts and not devices:
        return None

    def adjust(spec: VmSpec) -> VmSpec:
        return replace(spec,
                       mounts=spec.mounts + tuple(m for m in mounts if m not in spec.mounts),
                       default_devices=spec.default_devices + tuple(
                           d for d in devices if d not in spec.default_devices))

    return adjust


def _host(batch: int | None, ctx: dict[str, Any]) -> HostState:
    cached = ctx.get("host")
    if batch is not None and cached is not None and cached[0] == batch:
        return cached[1]  # type: ignore[no-any-return]
    host = HostState.read()
    ctx["host"] = (batch, host)
    return host


#: descriptors a worker may gain over its first task before it retires (a leak)
FD_SLACK = 32


def _home(ctx: dict[str, Any]) -> None:
    """Back in the host's mount namespace before anything is read: whatever the last
    VM did, nothing here may be resolved through a VM's /proc or /."""
    if "host_ns" not in ctx:
        ctx["host_ns"] = host_ns_fd()
        ctx["ns"] = _my_ns()
    syscalls.setns(ctx["host_ns"], C.CLONE_NEWNS)


def _my_ns() -> tuple[int, int]:
    st = os.stat("thread-self/ns/mnt", dir_fd=fsops.HOST_PROC)
    return st.st_dev, st.st_ino


def _fd_count() -> int:
    fd = os.open("thread-self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                 dir_fd=fsops.HOST_PROC)
    try:
        return len(os.listdir(fd)) - 1
    finally:
        os.close(fd)


def _checkup(ctx: dict[str, Any]) -> None:
    """After each VM: a worker that is not back home is retired by the pool once its
    task is done (``ctx["retire"]``), so one VM's trouble never follows the worker to
    the next task; see also :func:`after_task`."""
    if _my_ns() != ctx["ns"]:
        ctx["retire"] = "left in another mount namespace"


def after_task(ctx: dict[str, Any]) -> None:
    """After each task (the pool's ``after_task``): a worker that holds more
    descriptors than after its first task is retired.  Counted per task, not per VM:
    a listing of the worker's fd directory costs about a tenth of a VM's pipeline, and
    a burst of requests is handed over in tasks of many VMs."""
    n = _fd_count()
    base = ctx.setdefault("fds", n)
    if n > base + FD_SLACK:
        ctx["retire"] = f"holds {n - base} more descriptors than it started with"


def reconnect_vm(t: VmTask, ctx: dict[str, Any]) -> dict[str, Any] | None:
    """The pipeline for one VM: its outcome in the dict form of a report (what the
    service answers and accounts with), or None for a recorded VM that exited
    (forgotten: record and lock dropped)."""
    _home(ctx)
    try:
        o = _reconnect_vm(t, ctx)
        return None if o is None else o.to_dict()
    finally:
        _checkup(ctx)


def _reconnect_vm(t: VmTask, ctx: dict[str, Any]) -> Outcome | None:
    cand = t.cand
    if t.xml is not None:
        from ...state.libvirtspec import spec_from_domain_xml

        try:
            cand = replace(cand, spec=replace(spec_from_domain_xml(t.xml),
                                              source="libvirt-hook"))
        except NsmountError as exc:
            cand = replace(cand, error=f"domain XML: {exc.oneline()}")
    if cand.error:
        return unusable(cand)
    job = job_for(cand, bulk=t.bulk, sdir=t.sdir, lvdir=t.lvdir, timeout=t.timeout,
                  adjust_spec=spec_adjuster(t.mounts, t.default_devices))
    o = run_safe(job, _host(t.batch, ctx), ctx["host_ns"])
    return None if forget_if_gone(o, dry_run=False, sdir=t.sdir) else o


def warm_up(_payload: object, ctx: dict[str, Any]) -> None:
    """A new worker's first task: the host reading every VM task needs (and the pages
    it touches) done before a VM waits for it."""
    _home(ctx)
    _host(None, ctx)
    _checkup(ctx)


TASKS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "vm": reconnect_vm, "warm-up": warm_up}
