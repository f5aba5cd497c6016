"""The exceptions nsmount raises, one boundary for raw OSError.

Every error carries an exit code (distinct per kind, so scripts can branch on
it) and a hint telling the admin what to do.  Exit codes 0 and 1 are reserved
for "clean" and "repaired"; errors start at 2.
"""

from __future__ import annotations

import errno as _errno
import functools
from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])


class NsmountError(Exception):
    """Base class.  ``str(err)`` is a one-line message for the admin."""

    exit_code = 2
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def oneline(self) -> str:
        msg = str(self)
        return f"{msg} ({self.hint})" if self.hint else msg


class SpecError(NsmountError):
    """A VM spec (TOML/JSON, domain XML, status XML, command line) is malformed."""

    exit_code = 3


class UnsafePathError(SpecError):
    """A path outside /dev, with '..', a symlink loop, or a planted symlink."""

    exit_code = 4


class RefusedError(UnsafePathError):
    """An action nsmount will not do because it would be unsafe (a planted mount or
    file where it would write, a directory it would replace)."""


class DeviceMissingError(NsmountError):
    """A required device path does not exist on the host (or is not a device)."""

    exit_code = 5


class PrivilegeError(NsmountError):
    """EPERM/EACCES from the kernel: the command needs more privilege."""

    exit_code = 6
    hint = ("run as root: entering a VM needs CAP_SYS_ADMIN + CAP_SYS_CHROOT (setns) and "
            "CAP_SYS_PTRACE; building /dev needs CAP_MKNOD (see docs/privileges.rst)")


class CommandNotFoundError(NsmountError):
    """The command to exec does not exist."""

    exit_code = 7


class TargetError(NsmountError):
    """A target VM cannot be resolved, pinned or entered."""

    exit_code = 8


class NoSuchProcessError(TargetError):
    """The target process does not exist or exited while we worked on it."""

    exit_code = 9


class HostTargetError(TargetError):
    """The target shares the caller's mount namespace: refusing by construction."""

    exit_code = 10
    hint = "nsmount only works on a VM's private mount namespace, never the host's"


class NoRecordError(TargetError):
    """We do not know what the target should look like."""

    exit_code = 11
    hint = "supply one with --spec FILE or --domain-xml FILE"


class UnsupportedKernelError(NsmountError):
    """The running kernel lacks a needed syscall or flag."""

    exit_code = 12


class BusyError(NsmountError):
    """Another nsmount holds the VM's lock and did not release it in time."""

    exit_code = 13


class ActionError(NsmountError):
    """One action failed while being applied inside a namespace."""

    exit_code = 14


class ForeignNamespaceError(TargetError):
    """The target's mount namespace is owned by a user namespace other than nsmount's
    (the VM made it itself and may mount anything in it), or is not the namespace
    nsmount recorded when it launched the VM."""

    exit_code = 15
    hint = ("nsmount never enters a namespace a VM controls; restart the VM (its QEMU "
            "replaced the namespace it was started in)")


class DeadlineError(NsmountError):
    """The work for one VM did not finish within its deadline and was abandoned."""

    exit_code = 16
    hint = "a VM that blocks (FUSE, a frozen process) is abandoned; raise --timeout if it is slow"


class DeniedError(NsmountError):
    """The service refused a device: its policy does not grant it to this user, or the
    VM's pidfd did not prove that the VM is this user's."""

    exit_code = 17
    hint = ("ask the admin to grant the device in the service's policy "
            "(/etc/nsmount/policy.toml, docs/protocol.rst)")


def wrap_oserror(fn: _F) -> _F:
    """The boundary of the public API (psutil's ``wrap_exceptions`` in spirit): a raw
    OSError from below becomes the matching NsmountError, with the function's name."""
    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            raise from_oserror(exc, fn.__name__) from None

    return wrapper  # type: ignore[return-value]


def from_oserror(exc: OSError, what: str) -> NsmountError:
    """Turn a raw OSError into the matching NsmountError (the one boundary)."""
    where = f" {exc.filename}" if exc.filename else ""
    msg = f"{what}:{where}: {exc.strerror or exc}"
    if exc.errno in (_errno.EPERM, _errno.EACCES):
        return PrivilegeError(msg)
    if exc.errno == _errno.ESRCH:
        return NoSuchProcessError(msg)
    if exc.errno == _errno.ENOSYS:
        return UnsupportedKernelError(msg, hint="needs Linux 5.12 or newer")
    if exc.errno == _errno.ELOOP:
        return UnsafePathError(msg, hint="a symlink where nsmount expected a plain path")
    return ActionError(msg)
