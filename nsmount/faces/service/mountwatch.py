"""Host mount events: fanotify mount notifications on the host mount namespace
(``FAN_MNT_ATTACH``/``FAN_MNT_DETACH``, kernel 6.15+), else ``POLLPRI`` on
``/proc/self/mountinfo``.  Either way the watcher only says "the mount table
changed"; :func:`relevant_mounts` tells whether a mount VMs must see appeared."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable

from ...kernel import notify, syscalls
from ...model import mountinfo
from ...model.hostmounts import visible_top
from ...model.mountinfo import MountTree
from .loop import IN, PRI, Reactor

log = logging.getLogger("nsmount.service")

#: (mount point, fstype, "major:minor") of a mount VMs must see
#: mount point, fstype, st_dev, unique mount id (0 when the kernel has none): a mount
#: made again at the same place is a new key even when its st_dev is recycled
MountKey = tuple[str, str, str, int]


def relevant_mounts(extra: Iterable[str] = ()) -> frozenset[MountKey]:
    """Every visible hugetlbfs mount of the host, and the top mount at each configured
    path (when something other than its parent's filesystem is mounted there)."""
    tree = MountTree(mountinfo.read("self"))
    out: set[MountKey] = set()
    for m in tree.visible():
        if m.fstype == "hugetlbfs":
            out.add(_key(m.mountpoint, m.fstype, m.major, m.minor))
    for p in extra:
        top = visible_top(tree, p)
        if top is not None and top.mountpoint == p:
            out.add(_key(top.mountpoint, top.fstype, top.major, top.minor))
    return frozenset(out)


def _key(path: str, fstype: str, major: int, minor: int) -> MountKey:
    return (path, fstype, f"{major}:{minor}", syscalls.mount_unique_id(path) or 0)


class MountWatch:
    def __init__(self, reactor: Reactor, on_event: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.on_event = on_event
        self.method = "fanotify"
        nsfd = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.fd = notify.mount_events_fd(nsfd)
        except OSError as exc:
            log.info("fanotify mount events unavailable (%s); watching /proc/self/mountinfo "
                     "for POLLPRI instead", exc.strerror or exc)
            self.method = "pollpri"
            self.fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
            self._drain_mountinfo()
            reactor.add(self.fd, PRI, self._pollpri)
        else:
            reactor.add(self.fd, IN, self._fanotify)
        finally:
            os.close(nsfd)

    def _fanotify(self, _mask: int) -> None:
        kinds: set[str] = set()
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not buf:
                break
            for ev in notify.parse_mount_events(buf):
                kinds.add(ev.kind)
                log.debug("mount event %s (mount id %s)", ev.kind, ev.mnt_id)
        for k in sorted(kinds):
            self.on_event(k)

    def _drain_mountinfo(self) -> None:
        os.lseek(self.fd, 0, os.SEEK_SET)
        while os.read(self.fd, 1 << 16):
            pass

    def _pollpri(self, _mask: int) -> None:
        self._drain_mountinfo()  # reading resets the event
        self.on_event("change")

    def close(self) -> None:
        self.reactor.remove(self.fd)
        os.close(self.fd)
