"""One lock per VM (flock under the state dir) so concurrent repair/reconnect runs
serialise instead of racing on the same namespace."""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import BusyError
from .record import open_subdir


@contextmanager
def vm_lock(pid: int, starttime: int, *, sdir: str | None = None,
            timeout: float = 30.0) -> Iterator[bool]:
    """Hold the VM's lock; yields True when we had to wait for another nsmount."""
    dfd = open_subdir("locks", sdir)  # never follows a planted symlink
    try:
        fd = os.open(f"{pid}-{starttime}.lock",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        try:
            waited = flock_within(fd, timeout)
        except TimeoutError:
            raise BusyError(f"VM pid {pid} is locked by another nsmount for "
                            f"{timeout:.0f}s") from None
        yield waited
    finally:
        os.close(fd)


def flock_within(fd: int, timeout: float, interval: float = 0.01) -> bool:
    """An exclusive ``flock`` on ``fd``, tried every ``interval`` seconds (a blocking
    flock has no deadline); True when it had to wait, TimeoutError when not taken
    within ``timeout`` seconds.  Closing ``fd`` releases it."""
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return waited
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        waited = True
        if time.monotonic() > deadline:
            raise TimeoutError(f"flock not taken within {timeout:g}s")
        time.sleep(interval)


def drop_lock(pid: int, starttime: int, *, sdir: str | None = None) -> None:
    """Remove the lock file of a VM that exited."""
    try:
        dfd = open_subdir("locks", sdir)
    except OSError:
        return
    try:
        os.unlink(f"{pid}-{starttime}.lock", dir_fd=dfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)
