"""Targets: a running VM pinned by pidfd, with its namespace checked before entry.

A pid is only a number; between reading it and entering the namespace it can be
reused.  We open a pidfd first, read the start time, then open the process's mount
namespace (``/proc/PID/ns/mnt`` of the host's procfs, while the pidfd shows the
process alive, so the fd belongs to it).  That namespace fd is checked and is what
nsmount later enters -- never the pidfd, through which a VM that unshared a new
namespace after the check would be entered instead.  Refused here, before anything
else runs:

* a namespace that is the caller's own (the host's);
* a namespace owned by a user namespace other than nsmount's (``NS_GET_USERNS``): a
  QEMU that ran ``unshare(CLONE_NEWUSER|CLONE_NEWNS)`` keeps its pid and start time
  but may mount anything in that namespace, so nothing in it can be verified;
* (:meth:`Target.expect_namespace`) a namespace other than the one recorded at launch.
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass

from ..errors import (
    ForeignNamespaceError,
    HostTargetError,
    NoSuchProcessError,
    NsmountError,
    TargetError,
)
from ..kernel import syscalls
from ..model import mountinfo
from ..model.mountinfo import MountTree
from .files import read_state_file

#: 100000 mounts (fs.mount-max) of long paths
MAX_MOUNTINFO = 64 << 20

CLK_TCK = os.sysconf("SC_CLK_TCK")


def starttime(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks after boot)."""
    try:
        # os-level: a buffered file object costs more than the two reads it makes
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while chunk := os.read(fd, 4096):
                chunks.append(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcessError(f"no process with pid {pid}") from None
    # comm may hold spaces and parentheses: split after the last ')'
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[19])


def running(pid: int, started: int | None) -> bool:
    """Does ``pid`` still run, and (when ``started`` is given) is it the same process?"""
    try:
        return started is None or starttime(pid) == started
    except (NsmountError, OSError, ValueError, IndexError):
        return False


#: /proc/PID/cmdline is the process's own data: read no more than this
MAX_CMDLINE = 1 << 20


def read_cmdline(pid: int) -> bytes:
    """``/proc/PID/cmdline`` of the host's procfs, capped; NoSuchProcessError when gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read(MAX_CMDLINE)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcessError(f"pid {pid} exited") from None


def ns_id(pid: int | str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/mnt")
    return (st.st_dev, st.st_ino)


def _fd_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def _id_of(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


#: nsmount's own namespaces, taken once at import (always in the host namespace:
#: later a worker thread or process may sit inside a VM, where "/proc" is the VM's)
SELF_MNTNS = _id_of("/proc/self/ns/mnt")
SELF_USERNS = _id_of("/proc/self/ns/user")


def owned_by_us(ns_fd: int) -> bool:
    """True when the namespace ``ns_fd`` is owned by nsmount's own user namespace."""
    owner = syscalls.ns_owner(ns_fd)
    try:
        return _fd_id(owner) == SELF_USERNS
    finally:
        os.close(owner)


@dataclass
class Target:
    pid: int
    pidfd: int
    starttime: int
    name: str | None = None
    #: the checked mount namespace (an fd of /proc/PID/ns/mnt): what nsmount enters
    nsfd: int = -1
    #: st_dev of the /dev tmpfs recorded at launch (None: not launched by nsmount)
    recorded_dev: int | None = None

    _mntns: tuple[int, int] | None = None

    @property
    def mntns(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the pinned namespace (what ``nsfd`` is, for good)."""
        if self._mntns is None:
            self._mntns = _fd_id(self.nsfd)
        return self._mntns

    @classmethod
    def pin(cls, pid: int, *, expect_starttime: int | None = None, name: str | None = None,
            allow_host: bool = False) -> Target:
        if pid <= 0:
            raise NoSuchProcessError(f"invalid pid {pid}")
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise NoSuchProcessError(f"no process with pid {pid}") from None
        except PermissionError:
            raise TargetError(f"cannot open pid {pid}: permission denied") from None
        t = cls(pid, pidfd, 0, name)
        try:
            st = t.starttime = starttime(pid)
            if expect_starttime is not None and st != expect_starttime:
                raise NoSuchProcessError(
                    f"pid {pid} was reused (start time {st} != recorded {expect_starttime})")
            try:
                t.nsfd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NoSuchProcessError(f"pid {pid} exited") from None
            except PermissionError:
                raise TargetError(f"cannot open /proc/{pid}/ns/mnt: permission denied",
                                  hint="needs CAP_SYS_PTRACE over the target (run as root)"
                                  ) from None
            t.check_alive()  # the pid was not reused: the ns fd is the pinned process's
            if not allow_host and t.mntns == SELF_MNTNS:
                raise HostTargetError(
                    f"pid {pid} shares nsmount's own mount namespace (the host's); refusing")
            if not allow_host and not owned_by_us(t.nsfd):
                raise ForeignNamespaceError(
                    f"pid {pid}: its mount namespace is owned by another user namespace "
                    "(the process made its own); refusing to enter it")
            return t
        except BaseException:
            t.close()
            raise

    def expect_namespace(self, mntns: tuple[int, int] | None, dev: int | None) -> None:
        """Check the namespace against the one recorded at launch and remember the
        recorded /dev; ForeignNamespaceError when the VM is no longer in it."""
        if mntns is not None and tuple(mntns) != self.mntns:
            raise ForeignNamespaceError(
                f"pid {self.pid}: its mount namespace is not the one recorded at launch "
                "(the process moved to another); refusing to enter it")
        self.recorded_dev = dev

    def mount_table(self) -> MountTree:
        """The VM's mount table, read from the host side (``/proc/PID/mountinfo`` of the
        host's procfs, mount points relative to the VM's root) -- never through the
        ``/proc`` the VM sees, which it may have covered with FIFOs or lies.  Checked
        afterwards: the process is alive and still in the pinned namespace."""
        path = f"/proc/{self.pid}/mountinfo"
        try:
            raw = read_state_file(path, limit=MAX_MOUNTINFO)
        except FileNotFoundError:
            raise NoSuchProcessError(f"pid {self.pid} exited") from None
        self.check_alive()
        if _id_of(f"/proc/{self.pid}/ns/mnt") != self.mntns:
            raise ForeignNamespaceError(f"pid {self.pid} moved to another mount namespace "
                                        "during the run; refusing to go on")
        return MountTree(mountinfo.parse(raw.decode("latin-1")))

    def check_alive(self) -> None:
        """Raise NoSuchProcessError if the pinned process is gone (pidfd is readable
        once it exits, so poll it)."""
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        if p.poll(0):
            raise NoSuchProcessError(f"pid {self.pid} exited")

    def cmdline(self) -> bytes:
        return read_cmdline(self.pid)

    def close(self) -> None:
        for attr in ("pidfd", "nsfd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def label(self) -> str:
        return f"{self.name} (pid {self.pid})" if self.name else f"pid {self.pid}"
