"""Face 2: inspect, repair, hotplug and run-in for one running VM.

Library calls (``inspect``, ``repair``, ``device_add``, ``device_remove``) return an
:class:`~nsmount.pipeline.session.Outcome`; they never print (the CLI is :mod:`nsmount.cli.main`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

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
from ..model import elf
from ..model.display import escape_name, safe_line
from ..model.paths import canonical, is_within
from ..model.spec import VmSpec
from ..pipeline.outcome import Outcome
from ..pipeline.vm import Job, hotplug_paths, run_single
from ..pipeline.workers import DEFAULT_TIMEOUT
from ..state.sources import check_record, resolve_target
from ..state.target import Target


def _job(target: str | int, mode: str, *, explicit: VmSpec | None = None,
         lvdir: str | None = None, sdir: str | None = None,
         timeout: float | None = DEFAULT_TIMEOUT, **kw: object) -> Job:
    pid, domain = resolve_target(str(target), lvdir=lvdir)
    return Job(pid, domain, mode=mode, spec=explicit, state_dir=sdir, libvirt_state_dir=lvdir,
               timeout=None if timeout is None else float(timeout),
               **kw)  # type: ignore[arg-type]


def inspect(target: str | int, **kw: object) -> Outcome:
    """What the VM's namespace holds and what would be repaired (changes nothing)."""
    return run_single(_job(target, "inspect", **kw))  # type: ignore[arg-type]


def repair(target: str | int, *, dry_run: bool = False, rebuild_dev: bool = False,
           **kw: object) -> Outcome:
    """Repair one running VM's namespace; ``rebuild_dev`` swaps in a fresh /dev."""
    return run_single(_job(target, "repair", dry_run=dry_run, rebuild=rebuild_dev,
                           **kw))  # type: ignore[arg-type]


def device_add(target: str | int, paths: Sequence[str], *, dry_run: bool = False,
               **kw: object) -> Outcome:
    """Create nodes (and their symlink chains) inside a running VM and remember them."""
    return run_single(_job(target, "add", dry_run=dry_run, paths=hotplug_paths(paths),
                           **kw))  # type: ignore[arg-type]


def device_remove(target: str | int, paths: Sequence[str], *, dry_run: bool = False,
                  **kw: object) -> Outcome:
    """Unlink nodes inside the VM (never on the host, never a default node or a
    submount's content) and drop them from the record."""
    return run_single(_job(target, "remove", dry_run=dry_run, paths=hotplug_paths(paths),
                           **kw))  # type: ignore[arg-type]


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
