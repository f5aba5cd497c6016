"""nsmount: mount-namespace and mount-propagation manager for QEMU virtual machines.

Three faces over one core:

* launchers: :func:`launch` (fork + build + exec) and :func:`prepare`/:func:`build`;
* repair of one running VM: :func:`inspect`, :func:`repair`, :func:`device_add`,
  :func:`device_remove`;
* :func:`reconnect` of every running VM after a VM-manager daemon restart.

Errors are :class:`NsmountError` subclasses carrying an ``exit_code``; raw
``OSError`` does not escape the public functions' contracts except from the
low-level :mod:`nsmount.kernel` layer.
"""

from __future__ import annotations

from typing import Any

from .errors import (
    BusyError,
    CommandNotFoundError,
    DeviceMissingError,
    HostTargetError,
    NoRecordError,
    NoSuchProcessError,
    NsmountError,
    PrivilegeError,
    SpecError,
    TargetError,
    UnsafePathError,
)
from .model.spec import DEFAULT_DEVICES, DeviceRequest, VmSpec

__version__ = "0.1.0"


def launch(spec: VmSpec, argv: list[str], **kw: Any) -> Any:
    from .faces.launcher import launch as _launch

    return _launch(spec, argv, **kw)


def prepare(spec: VmSpec, **kw: Any) -> Any:
    from .faces.launcher import prepare as _prepare

    return _prepare(spec, **kw)


def build(plan: Any) -> None:
    from .faces.launcher import build as _build

    _build(plan)


def inspect(target: str | int, **kw: Any) -> Any:
    from .faces.repair import inspect as _inspect

    return _inspect(target, **kw)


def repair(target: str | int, **kw: Any) -> Any:
    from .faces.repair import repair as _repair

    return _repair(target, **kw)


def device_add(target: str | int, paths: list[str], **kw: Any) -> Any:
    from .faces.repair import device_add as _add

    return _add(target, paths, **kw)


def device_remove(target: str | int, paths: list[str], **kw: Any) -> Any:
    from .faces.repair import device_remove as _remove

    return _remove(target, paths, **kw)


def reconnect(**kw: Any) -> Any:
    from .faces.reconnect import reconnect as _reconnect

    return _reconnect(**kw)


__all__ = [
    "DEFAULT_DEVICES",
    "BusyError",
    "CommandNotFoundError",
    "DeviceMissingError",
    "DeviceRequest",
    "HostTargetError",
    "NoRecordError",
    "NoSuchProcessError",
    "NsmountError",
    "PrivilegeError",
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
