"""nsmount: mount-namespace and mount-propagation manager for QEMU virtual machines.

Faces over one core (:mod:`nsmount.pipeline`):

* launchers: :func:`launch` (fork + build + exec), or :func:`prepare` then
  :func:`build` in a process of your own;
* one running VM: :func:`inspect`, :func:`repair`, :func:`device_add`,
  :func:`device_remove`;
* :func:`reconnect`: every running VM, after a VM-manager daemon restart.

One vocabulary everywhere: ``state_dir`` (nsmount's, default ``$NSMOUNT_STATE_DIR`` or
``/run/nsmount``), ``libvirt_state_dir`` (default ``$NSMOUNT_LIBVIRT_STATE_DIR`` or
``/run/libvirt/qemu``), ``spec`` (what the VM should have, when you know better than
nsmount's record, libvirt's status XML or the QEMU command line), ``dry_run``, and
``timeout`` (seconds per VM; a VM that blocks longer is abandoned; ``None`` for one VM:
no deadline, no worker process, a few ms faster).  Every function
may be called any number of times.  Errors are :class:`NsmountError` subclasses with
an ``exit_code``; no raw ``OSError`` escapes (:func:`nsmount.errors.wrap_oserror`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import (
    BusyError,
    CommandNotFoundError,
    DeadlineError,
    DeviceMissingError,
    ForeignNamespaceError,
    HostTargetError,
    NoRecordError,
    NoSuchProcessError,
    NsmountError,
    PrivilegeError,
    RefusedError,
    SpecError,
    TargetError,
    UnsafePathError,
    wrap_oserror,
)
from .model.spec import DEFAULT_DEVICES, DeviceRequest, VmSpec

if TYPE_CHECKING:  # imported lazily: the hook and the CLI start faster without them
    from .faces.launcher import Launched, LaunchPlan
    from .pipeline.outcome import Outcome, Report

__version__ = "0.2.0"

#: seconds of work one VM may take before it is abandoned
DEFAULT_TIMEOUT = 30.0


@wrap_oserror
def prepare(spec: VmSpec) -> LaunchPlan:
    """Read the host and plan a VM's namespace (changes nothing; no root needed)."""
    from .faces.launcher import prepare as _prepare

    return _prepare(_spec(spec))


@wrap_oserror
def build(plan: LaunchPlan) -> None:
    """Build the planned namespace in the calling process (single-threaded, root):
    unshare, make ``/`` slave, build ``/dev``.  Then exec QEMU yourself."""
    from .faces.launcher import build as _build

    _build(plan)


@wrap_oserror
def launch(spec: VmSpec, argv: Sequence[str], *, state_dir: str | None = None,
           pass_fds: Sequence[int] = ()) -> Launched:
    """Fork, build the namespace in the child, record it and exec ``argv`` there.
    Errors before the exec are raised here; the result is a :class:`Launched`
    (``pid``, ``pidfd``, ``poll``, ``wait``, ``send_signal``; a context manager)."""
    from .faces.launcher import launch as _launch

    return _launch(_spec(spec), list(argv), state_dir=state_dir, pass_fds=pass_fds)


@wrap_oserror
def inspect(target: str | int, *, spec: VmSpec | None = None, state_dir: str | None = None,
            libvirt_state_dir: str | None = None, timeout: float | None = DEFAULT_TIMEOUT
            ) -> Outcome:
    """What a running VM's namespace holds and what would be repaired (changes nothing).
    ``target``: a pid, ``"pid:N"`` or a libvirt domain name."""
    from .faces.repair import inspect as _inspect

    return _inspect(target, **_common(spec, state_dir, libvirt_state_dir, timeout))


@wrap_oserror
def repair(target: str | int, *, dry_run: bool = False, rebuild_dev: bool = False,
           spec: VmSpec | None = None, state_dir: str | None = None,
           libvirt_state_dir: str | None = None, timeout: float | None = DEFAULT_TIMEOUT
           ) -> Outcome:
    """Repair a running VM's namespace; ``rebuild_dev`` swaps in a fresh ``/dev``."""
    from .faces.repair import repair as _repair

    return _repair(target, dry_run=dry_run, rebuild_dev=rebuild_dev,
                   **_common(spec, state_dir, libvirt_state_dir, timeout))


@wrap_oserror
def device_add(target: str | int, paths: Sequence[str], *, dry_run: bool = False,
               spec: VmSpec | None = None, state_dir: str | None = None,
               libvirt_state_dir: str | None = None, timeout: float | None = DEFAULT_TIMEOUT
               ) -> Outcome:
    """Create device nodes (and their symlink chains) inside a running VM."""
    from .faces.repair import device_add as _add

    return _add(target, _paths(paths), dry_run=dry_run,
                **_common(spec, state_dir, libvirt_state_dir, timeout))


@wrap_oserror
def device_remove(target: str | int, paths: Sequence[str], *, dry_run: bool = False,
                  spec: VmSpec | None = None, state_dir: str | None = None,
                  libvirt_state_dir: str | None = None, timeout: float | None = DEFAULT_TIMEOUT
                  ) -> Outcome:
    """Remove device nodes from inside a running VM (never a default node)."""
    from .faces.repair import device_remove as _remove

    return _remove(target, _paths(paths), dry_run=dry_run,
                   **_common(spec, state_dir, libvirt_state_dir, timeout))


@wrap_oserror
def reconnect(*, dry_run: bool = False, jobs: int = 1, state_dir: str | None = None,
              libvirt_state_dir: str | None = None, scan: bool = True,
              timeout: float = DEFAULT_TIMEOUT) -> Report:
    """Reconnect every running VM (records, libvirt's state dir, a process scan):
    hugetlbfs mounts and per-domain dirs made visible, the rest repaired.  ``jobs``
    worker processes at most; one VM's failure is in the report, never raised."""
    from .faces.reconnect import reconnect as _reconnect

    if not isinstance(jobs, int) or jobs < 1:
        raise SpecError(f"jobs must be a positive integer, not {jobs!r}")
    return _reconnect(dry_run=dry_run, jobs=jobs, sdir=state_dir, lvdir=libvirt_state_dir,
                      scan=scan, timeout=_timeout(timeout) or DEFAULT_TIMEOUT)


# ------------------------------------------------------------------ helpers
def _spec(spec: object) -> VmSpec:
    if not isinstance(spec, VmSpec):
        raise SpecError(f"expected a VmSpec, not {type(spec).__name__}")
    return spec


def _paths(paths: object) -> list[str]:
    if isinstance(paths, (str, bytes)) or not all(isinstance(p, str) for p in paths):  # type: ignore[attr-defined]
        raise SpecError("paths must be a list of device paths")
    return list(paths)  # type: ignore[call-overload]


def _timeout(timeout: object) -> float | None:
    if timeout is None:
        return None  # no deadline: in-process, no fork (see pipeline.vm.run_single)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise SpecError(f"timeout must be a positive number of seconds, not {timeout!r}")
    return float(timeout)


def _common(spec: VmSpec | None, state_dir: str | None, libvirt_state_dir: str | None,
            timeout: float | None) -> dict[str, Any]:
    return {"explicit": None if spec is None else _spec(spec), "sdir": state_dir,
            "lvdir": libvirt_state_dir, "timeout": _timeout(timeout)}


_LAZY = {"Launched": "faces.launcher", "LaunchPlan": "faces.launcher",
         "Outcome": "pipeline.outcome", "Report": "pipeline.outcome"}


def __getattr__(name: str) -> Any:
    """The result types, imported on first use (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nsmount' has no attribute {name!r}")


__all__ = [
    "DEFAULT_DEVICES",
    "DEFAULT_TIMEOUT",
    "BusyError",
    "CommandNotFoundError",
    "DeadlineError",
    "DeviceMissingError",
    "DeviceRequest",
    "ForeignNamespaceError",
    "HostTargetError",
    "LaunchPlan",
    "Launched",
    "NoRecordError",
    "NoSuchProcessError",
    "NsmountError",
    "Outcome",
    "PrivilegeError",
    "RefusedError",
    "Report",
    "SpecError",
    "TargetError",
    "UnsafePathError",
    "VmSpec",
    "build",
    "device_add",
    "device_remove",
    "inspect",
    "launch",
    "prepare",
    "reconnect",
    "repair",
]
