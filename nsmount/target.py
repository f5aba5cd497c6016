"""Targets: a running VM pinned by pidfd, with its identity checked.

A pid is only a number; between reading it and entering the namespace it can be
reused.  We open a pidfd first, read the start time, and enter through the pidfd,
so a recycled pid is never touched.  A target in the caller's own mount namespace
is refused here, by construction, before anything else runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import HostTargetError, NoSuchProcessError, TargetError

CLK_TCK = os.sysconf("SC_CLK_TCK")


def starttime(pid: int) -> int:
    """Field 22 of /proc/PID/stat (clock ticks after boot)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcessError(f"no process with pid {pid}") from None
    # comm may hold spaces and parentheses: split after the last ')'
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[19])


def ns_id(pid: int | str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/mnt")
    return (st.st_dev, st.st_ino)


@dataclass
class Target:
    pid: int
    pidfd: int
    starttime: int
    name: str | None = None

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
        try:
            st = starttime(pid)
            if expect_starttime is not None and st != expect_starttime:
                raise NoSuchProcessError(
                    f"pid {pid} was reused (start time {st} != recorded {expect_starttime})")
            t = cls(pid, pidfd, st, name)
            if not allow_host and t.shares_caller_ns():
                raise HostTargetError(
                    f"pid {pid} shares nsmount's own mount namespace (the host's); refusing")
            t.check_alive()
            return t
        except BaseException:
            os.close(pidfd)
            raise

    def shares_caller_ns(self) -> bool:
        try:
            return ns_id(self.pid) == ns_id("self")
        except FileNotFoundError:
            raise NoSuchProcessError(f"pid {self.pid} exited") from None
        except PermissionError:
            raise TargetError(f"cannot read /proc/{self.pid}/ns/mnt: permission denied",
                              hint="needs CAP_SYS_PTRACE over the target (run as root)"
                              ) from None

    def check_alive(self) -> None:
        """Raise NoSuchProcessError if the pinned process is gone (pidfd is readable
        once it exits, so poll it)."""
        import select

        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        if p.poll(0):
            raise NoSuchProcessError(f"pid {self.pid} exited")

    def cmdline(self) -> bytes:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise NoSuchProcessError(f"pid {self.pid} exited") from None

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def label(self) -> str:
        return f"{self.name} (pid {self.pid})" if self.name else f"pid {self.pid}"
