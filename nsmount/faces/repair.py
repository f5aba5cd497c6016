"""Face 2: inspect, repair, hotplug and run-in for one running VM.

Library calls (``inspect``, ``repair``, ``device_add``, ``device_remove``) return an
:class:`~nsmount.pipeline.session.Outcome`; they never print (the CLI is :mod:`nsmount.cli.main`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn

from ..engine.actions import Action, RemoveEntry
from ..errors import (
    CommandNotFoundError,
    NsmountError,
    SpecError,
    UnsafePathError,
    from_oserror,
)
from ..engine.hoststate import HostState
from ..kernel import consts as C
from ..kernel import syscalls
from ..state.locks import vm_lock
from ..model import elf
from ..model.display import escape_name, safe_line
from ..model.paths import canonical, is_strictly_within, is_within
from ..model.spec import VmSpec
from ..pipeline.session import Outcome, VmSession, host_ns_fd
from ..state.sources import check_record, resolve_target, spec_for, update_record
from ..state.target import Target
from ..pipeline.workers import DEFAULT_TIMEOUT, run_one


@contextmanager
def pinned(target: str | int, *, explicit: VmSpec | None = None, lvdir: str | None = None,
           sdir: str | None = None, timeout: float = DEFAULT_TIMEOUT
           ) -> Iterator[tuple[Target, VmSpec]]:
    """Resolve, pin (pidfd + start time + checked namespace; host and VM-owned
    namespaces refused), check against the launch record, find the spec, lock."""
    pid, domain = resolve_target(str(target), lvdir=lvdir)
    with Target.pin(pid, name=domain) as t:
        spec = spec_for(t, explicit=explicit, domain=domain, lvdir=lvdir, sdir=sdir)
        if t.name is None and spec.name:
            t.name = spec.name
        with vm_lock(t.pid, t.starttime, sdir=sdir, timeout=timeout):
            t.check_alive()  # it may have exited while we waited for the lock
            yield t, spec


def _run(t: Target, spec: VmSpec, host: HostState | None = None, *,
         timeout: float = DEFAULT_TIMEOUT, **kw: object) -> Outcome:
    """The session's observe/plan/apply in a forked worker under a deadline (``kw``
    goes to :meth:`VmSession.work`); DeadlineError when the VM blocks it."""
    sess = VmSession(t, spec, host or HostState.read())
    hfd = host_ns_fd()
    try:
        return run_one(lambda: sess.work(hfd, **kw), timeout=timeout)  # type: ignore[arg-type]
    finally:
        os.close(hfd)


def inspect(target: str | int, **kw: object) -> Outcome:
    with pinned(target, **kw) as (t, spec):  # type: ignore[arg-type]
        return _run(t, spec, dry_run=True, inspect=True, timeout=_timeout(kw))


def repair(target: str | int, *, dry_run: bool = False, rebuild_dev: bool = False,
           **kw: object) -> Outcome:
    with pinned(target, **kw) as (t, spec):  # type: ignore[arg-type]
        out = _run(t, spec, dry_run=dry_run, rebuild=rebuild_dev, timeout=_timeout(kw))
        new_dev = out.extra.pop("new_dev", None)
        if new_dev is not None and t.recorded_dev is not None:
            # the rebuilt /dev is the VM's own from now on
            update_record(t, spec, kw.get("sdir"), dev=new_dev)  # type: ignore[arg-type]
        return out


def _timeout(kw: dict[str, object]) -> float:
    return float(kw.get("timeout") or DEFAULT_TIMEOUT)  # type: ignore[arg-type]


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
        out = _run(t, only, dry_run=dry_run, nodes_only=True, timeout=_timeout(kw))
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
        out = _run(t, empty, host, dry_run=dry_run, nodes_only=True, extra=acts,
                   timeout=_timeout(kw))
        if out.status == "repaired" and all(r.ok and r.note == "already absent"
                                            for r in out.results):
            out.status = "ok"  # nothing was there to remove: nothing changed
        if not dry_run and out.status != "failed":
            update_record(t, spec.without_devices(clean), kw.get("sdir"))  # type: ignore[arg-type]
        return out


#: what the dynamic loader reads by path after exec: in the VM's namespace these must
#: be the host's own files and directories (same inode), or run-in refuses
LOADER_PATHS = ("/etc/ld.so.cache", "/etc/ld.so.preload", "/lib", "/lib64", "/usr/lib",
                "/usr/lib64", "/usr/local/lib", "/lib/x86_64-linux-gnu",
                "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
                "/usr/lib/aarch64-linux-gnu")


def _identities(paths: Sequence[str]) -> dict[str, tuple[int, int] | None]:
    out: dict[str, tuple[int, int] | None] = {}
    for p in paths:
        try:
            st = os.stat(p)
            out[p] = (st.st_dev, st.st_ino)
        except OSError:
            out[p] = None
    return out


def run_in(target: str | int, argv: Sequence[str], *, lvdir: str | None = None,
           sdir: str | None = None, env: dict[str, str] | None = None) -> NoReturn:
    """exec the HOST's ``argv[0]`` inside the VM's mount namespace.

    Nothing found in the VM is executed: the binary is looked up on the host and
    opened before entering, then executed by fd (``execveat``).  Only ELF binaries
    (a script's interpreter would be looked up in the VM), and only when the dynamic
    loader and the library directories the VM shows are the host's own inodes.  The
    target is pinned and its namespace checked (host and VM-owned namespaces refused)
    like every other command.
    """
    import shutil

    if not argv:
        raise CommandNotFoundError("no command given")
    exe = shutil.which(argv[0])
    if exe is None:
        raise CommandNotFoundError(f"command not found on the host: {argv[0]}",
                                   hint="run-in only runs host binaries")
    try:
        fd = os.open(exe, os.O_RDONLY | os.O_CLOEXEC)
        head = os.pread(fd, 1 << 16, 0)
    except OSError as exc:
        raise CommandNotFoundError(f"cannot open {exe}: {exc.strerror}") from None
    interp = elf.interpreter(head)
    watched = (interp, *LOADER_PATHS) if interp else LOADER_PATHS
    on_host = _identities(watched)
    pid, domain = resolve_target(str(target), lvdir=lvdir)
    t = Target.pin(pid, name=domain)
    check_record(t, sdir)
    _no_foreign_mounts(t, watched)
    try:
        syscalls.setns(t.nsfd, C.CLONE_NEWNS)
    except OSError as exc:
        raise from_oserror(exc, f"cannot enter {t.label()}") from None
    in_vm = _identities(watched)
    differ = [p for p in watched if in_vm[p] != on_host[p]]
    if differ:
        os._exit(_refuse_in_vm(f"refusing to run {exe} in {t.label()}: the VM shows its own "
                               f"{', '.join(differ)} (the loader would run the VM's code)"))
    os.chdir("/")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        syscalls.execveat(fd, list(argv), dict(os.environ) if env is None else env)
    except OSError as exc:
        os._exit(_refuse_in_vm(f"cannot exec {exe}: {exc.strerror}", 7))
    raise AssertionError("execveat returned")  # pragma: no cover


def _no_foreign_mounts(t: Target, watched: Sequence[str]) -> None:
    """Every mount the VM has on or under a loader path (a file bind-mounted over a
    library would pass the directory checks) must be the host's mount there."""
    roots = {canonical(p) for p in watched} | {"/usr", "/etc"}
    host = {(m.mountpoint, m.dev, m.root) for m in HostState.read().tree.visible()}
    for m in t.mount_table().visible():
        if any(is_within(m.mountpoint, r) for r in roots) and \
                (m.mountpoint, m.dev, m.root) not in host:
            raise UnsafePathError(f"refusing to run a host binary in {t.label()}: the VM "
                                  f"has its own mount at {escape_name(m.mountpoint)}")


def _refuse_in_vm(msg: str, code: int = UnsafePathError.exit_code) -> int:
    """Inside the VM's namespace nothing may be looked up any more (not even Python's
    lazy imports): report and leave with the exit code."""
    os.write(2, f"nsmount: error: {safe_line(msg)}\n".encode("utf-8", "backslashreplace"))
    return code


__all__ = [
    "NsmountError",
    "SpecError",
    "device_add",
    "device_remove",
    "inspect",
    "repair",
    "run_in",
]
