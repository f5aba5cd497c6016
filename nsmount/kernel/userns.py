"""User namespaces for unprivileged (rootless) launches.

``enter_own(uid, gid)`` moves the calling process into a new user namespace (and,
with it, a new mount namespace owned by it) and maps the caller's uid and gid to
themselves.  An unprivileged process may write exactly this mapping into its own new
namespace: one line, its own ids, after ``setgroups`` was set to ``deny`` (else
``gid_map`` is refused).  The maps are written through the host procfs fd taken when
nsmount started (``fsops.HOST_PROC``), never through a path in a namespace.

The calling process must be single-threaded (``unshare(CLONE_NEWUSER)`` fails with
EINVAL otherwise).  Standard library only.
"""

from __future__ import annotations

import errno
import os

from . import consts as C
from . import syscalls
from .fsops import HOST_PROC


def _write(name: str, text: str) -> None:
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(f"self/{name}", flags, dir_fd=HOST_PROC) if HOST_PROC >= 0 \
            else os.open(f"/proc/self/{name}", flags)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} (opening /proc/self/{name})",
                      f"/proc/self/{name}") from None
    try:
        os.write(fd, text.encode())
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror} (writing /proc/self/{name})",
                      f"/proc/self/{name}") from None
    finally:
        os.close(fd)


def write_own_maps(uid: int, gid: int) -> None:
    """``setgroups deny`` + ``uid_map``/``gid_map`` mapping ``uid``/``gid`` to themselves."""
    try:
        _write("setgroups", "deny")
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # kernels < 3.19 have no setgroups file
            raise
    _write("uid_map", f"{uid} {uid} 1\n")
    _write("gid_map", f"{gid} {gid} 1\n")


def enter_own(uid: int | None = None, gid: int | None = None, *, mount: bool = True) -> None:
    """unshare(CLONE_NEWUSER[|CLONE_NEWNS]) and map the caller's ids to themselves."""
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    syscalls.unshare(C.CLONE_NEWUSER | (C.CLONE_NEWNS if mount else 0))
    write_own_maps(uid, gid)


def userns_id() -> tuple[int, int]:
    """(st_dev, st_ino) of the caller's user namespace."""
    fd = os.open("self/ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=HOST_PROC) \
        if HOST_PROC >= 0 else os.open("/proc/self/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino)
    finally:
        os.close(fd)
