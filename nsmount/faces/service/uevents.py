"""Device events from the kernel (pyroute2's netlink ``UeventSocket``).

Each uevent naming a device node (``DEVNAME``) becomes ``on_device(path, action)``
with ``path`` the canonical ``/dev/...`` path.  A receive-buffer overflow (a storm)
loses events: ``on_overflow()`` then asks for a resync of every VM with devices.
There is no udev here: owner and mode always come from the host node itself.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
from collections.abc import Callable

from ...errors import SpecError
from ...model.paths import canonical
from .loop import IN, Reactor

log = logging.getLogger("nsmount.service")

#: messages read per wake-up before yielding to the loop
BURST = 256


def dev_path(devname: object) -> str | None:
    """``/dev/<DEVNAME>`` canonical, or None for a name that is not a plain path."""
    if not isinstance(devname, str) or not devname or len(devname) > 1024:
        return None
    try:
        return canonical("/dev/" + devname)
    except SpecError:
        return None


class UeventWatch:
    def __init__(self, reactor: Reactor, on_device: Callable[[str, str], None],
                 on_overflow: Callable[[], None]) -> None:
        from pyroute2 import UeventSocket

        for noisy in ("pyroute2", "asyncio"):  # their debug output is per message
            logging.getLogger(noisy).setLevel(max(logging.INFO, log.getEffectiveLevel()))

        self.reactor = reactor
        self.on_device = on_device
        self.on_overflow = on_overflow
        self.sock = UeventSocket()
        self.sock.bind()
        self.fd = self.sock.fileno()
        try:  # room for a storm; SO_RCVBUFFORCE needs CAP_NET_ADMIN (root has it)
            s = socket.socket(fileno=self.fd)
            try:
                s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
            finally:
                s.detach()
        except OSError:
            pass
        reactor.add(self.fd, IN, self._read)

    def _read(self, _mask: int) -> None:
        for _ in range(BURST):
            if not select.select([self.fd], [], [], 0)[0]:
                return
            try:
                msgs = self.sock.get()
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    log.warning("uevent buffer overflowed: events lost; resyncing VM devices")
                    self.on_overflow()
                    continue
                raise
            for m in msgs:
                try:
                    name, action = m.get("DEVNAME"), m.get("ACTION")
                except Exception:
                    continue
                path = dev_path(name)
                if path is not None:
                    self.on_device(path, str(action or "?"))

    def close(self) -> None:
        self.reactor.remove(self.fd)
        self.sock.close()
