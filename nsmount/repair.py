"""Face 2: inspect, repair, hotplug and run-in for one running VM.

Library calls (``inspect``, ``repair``, ``device_add``, ``device_remove``) return an
:class:`~nsmount.session.Outcome`; they never print (the CLI is :mod:`nsmount.cli`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from .actions import Action, RemoveEntry
from .errors import (
    CommandNotFoundError,
    NoSuchProcessError,
    NsmountError,
    SpecError,
    UnsafePathError,
    from_oserror,
)
from .hoststate import HostState
from .kernel import consts as C
from .kernel import syscalls
from .kernel.nsenter import call_in_mntns
from .locks import vm_lock
from .model.paths import canonical, is_strictly_within
from .model.spec import VmSpec
from .session import Outcome, VmSession, host_ns_fd
from .sources import resolve_target, spec_for, update_record
from .target import Target


@contextmanager
def pinned(target: str | int, *, explicit: VmSpec | None = None, lvdir: str | None = None,
           sdir: str | None = None) -> Iterator[tuple[Target, VmSpec]]:
    """Resolve, pin (pidfd + start time), refuse the host, lock, and find the spec."""
    pid, domain = resolve_target(str(target), lvdir=lvdir)
    with Target.pin(pid, name=domain) as t:
        spec = spec_for(t, explicit=explicit, domain=domain, lvdir=lvdir, sdir=sdir)
        if t.name is None and spec.name:
            t.name = spec.name
        with vm_lock(t.pid, t.starttime, sdir=sdir):
            yield t, spec


def _in_vm(t: Target, fn: Callable[..., Outcome], *args: object) -> Outcome:
    try:
        return call_in_mntns(t.pidfd, fn, *args)
    except ProcessLookupError:  # setns through the pidfd of a process that has exited
        raise NoSuchProcessError(f"pid {t.pid} exited during the run") from None


def _run(t: Target, spec: VmSpec, host: HostState | None = None, **kw: object) -> Outcome:
    """Enter the VM once and let a session observe, plan and apply (``kw`` goes to
    :meth:`VmSession.work`)."""
    sess = VmSession(t, spec, host or HostState.read())
    hfd = host_ns_fd()
    try:
        return _in_vm(t, _entered, sess, hfd, kw)
    finally:
        os.close(hfd)


def _entered(sess: VmSession, hfd: int, kw: dict[str, object]) -> Outcome:
    return sess.work(hfd, **kw)  # type: ignore[arg-type]


def inspect(target: str | int, **kw: object) -> Outcome:
    with pinned(target, **kw) as (t, spec):  # type: ignore[arg-type]
        return _run(t, spec, dry_run=True, inspect=True)


def repair(target: str | int, *, dry_run: bool = False, rebuild_dev: bool = False,
           **kw: object) -> Outcome:
    with pinned(target, **kw) as (t, spec):  # type: ignore[arg-type]
        return _run(t, spec, dry_run=dry_run, rebuild=rebuild_dev)


def _check_hotplug_paths(paths: Sequence[str]) -> list[str]:
    out = []
    for p in paths:
        c = canonical(p, what="device path")
        if not is_strictly_within(c, "/dev"):
            raise UnsafePathError(f"{p} is not under /dev")
        out.append(c)
    return out


def device_add(target: str | int, paths: Sequence[str], *, dry_run: bool = False,
               **kw: object) -> Outcome:
    """Create nodes (and their symlink chains) inside a running VM and remember them."""
    clean = _check_hotplug_paths(paths)
    with pinned(target, **kw) as (t, spec):  # type: ignore[arg-type]
        only = VmSpec(name=spec.name, domain_id=spec.domain_id, default_devices=(),
                      source=spec.source).with_devices(clean)
        out = _run(t, only, dry_run=dry_run, nodes_only=True)
        if not dry_run and out.status != "failed":
            update_record(t, spec.with_devices(clean), kw.get("sdir"))  # type: ignore[arg-type]
        return out


def device_remove(target: str | int, paths: Sequence[str], *, dry_run: bool = False,
                  **kw: object) -> Outcome:
    """Unlink nodes inside the VM (never on the host, never a default node or a
    submount's content) and drop them from the record."""
    clean = _check_hotplug_paths(paths)
    with pinned(target, **kw) as (t, spec):  # type: ignore[arg-type]
        host = HostState.read()
        defaults = {canonical(d) for d in spec.default_devices}
        subs = [h.path for h in host.submounts]
        for p in clean:
            if p in defaults:
                raise UnsafePathError(f"{p} is a default node; refusing to remove it")
            if any(is_strictly_within(p, s) or p == s for s in subs):
                raise UnsafePathError(f"{p} is a mount point or inside a submount; refusing")
        acts: list[Action] = [RemoveEntry(p, reason="hotplug remove") for p in clean]
        empty = VmSpec(name=spec.name, domain_id=spec.domain_id, default_devices=(),
                       source=spec.source)
        out = _run(t, empty, host, dry_run=dry_run, nodes_only=True, extra=acts)
        if out.status == "repaired" and all(r.ok and r.note == "already absent"
                                            for r in out.results):
            out.status = "ok"  # nothing was there to remove: nothing changed
        if not dry_run and out.status != "failed":
            update_record(t, spec.without_devices(clean), kw.get("sdir"))  # type: ignore[arg-type]
        return out


def run_in(target: str | int, argv: Sequence[str], **kw: object) -> NoReturn:
    """exec ``argv`` inside the VM's mount namespace (pidfd-pinned; host refused)."""
    import shutil

    if not argv:
        raise CommandNotFoundError("no command given")
    pid, domain = resolve_target(str(target), lvdir=kw.get("lvdir"))  # type: ignore[arg-type]
    t = Target.pin(pid, name=domain)
    try:
        syscalls.setns(t.pidfd, C.CLONE_NEWNS)
    except OSError as exc:
        raise from_oserror(exc, f"cannot enter {t.label()}") from None
    os.chdir("/")
    exe = shutil.which(argv[0])
    if exe is None:
        raise CommandNotFoundError(f"command not found inside the VM namespace: {argv[0]}")
    sys.stdout.flush()
    os.execv(exe, list(argv))


__all__ = [
    "NsmountError",
    "SpecError",
    "device_add",
    "device_remove",
    "inspect",
    "repair",
    "run_in",
]
