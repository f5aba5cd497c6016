"""What the service's warm workers (:mod:`.pool`) do: the one per-VM pipeline.

A task names one VM (a :class:`~nsmount.faces.reconnect.Candidate` the service
tracks, or one a hook request named) and the settings to run it with.  It runs in a
worker process under the task's deadline, never in the event loop.  The VMs of one
batch share one reading of the host's mount table (keyed by the batch number); a
request reads it afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ...engine.hoststate import HostState
from ...errors import NsmountError
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


def reconnect_vm(t: VmTask, ctx: dict[str, Any]) -> Outcome | None:
    """The pipeline for one VM: its outcome, or None for a recorded VM that exited
    (forgotten: record and lock dropped)."""
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
    if "host_ns" not in ctx:
        ctx["host_ns"] = host_ns_fd()
    job = job_for(cand, bulk=t.bulk, sdir=t.sdir, lvdir=t.lvdir, timeout=t.timeout,
                  adjust_spec=spec_adjuster(t.mounts, t.default_devices))
    o = run_safe(job, _host(t.batch, ctx), ctx["host_ns"])
    return None if forget_if_gone(o, dry_run=False, sdir=t.sdir) else o


def warm_up(_payload: object, ctx: dict[str, Any]) -> None:
    """A new worker's first task: the host reading every VM task needs (and the pages
    it touches) done before a VM waits for it."""
    _host(None, ctx)
    if "host_ns" not in ctx:
        ctx["host_ns"] = host_ns_fd()


TASKS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "vm": reconnect_vm, "warm-up": warm_up}
