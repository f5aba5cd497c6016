"""Device events from the kernel: the netlink uevent socket, messages parsed by
pyroute2's uevent parser.

Each uevent naming a device node (``DEVNAME``) becomes ``on_device(path, action)``
with ``path`` the canonical ``/dev/...`` path.  A receive-buffer overflow (a storm)
loses events: ``on_overflow()`` then asks for a resync of every VM with devices.
There is no udev here: owner and mode always come from the host node itself.

The socket is read here, not through pyroute2's ``UeventSocket.get()``: pyroute2 0.9
reads the socket from its own asyncio loop into a queue, so a message can sit in that
queue while the socket itself is no longer readable -- the event loop would not look
again until the next uevent on the machine (measured: ~500 of 1000 events of a storm
left behind).  Reading datagrams until ``EAGAIN`` leaves nothing behind.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

from ...errors import SpecError
from ...model.paths import canonical
from .loop import IN, Reactor

log = logging.getLogger("nsmount.service")

#: datagrams read per wake-up before yielding to the loop (level-triggered: the rest
#: is read on the next turn)
BURST = 256
NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
SO_RCVBUFFORCE = 33
#: a uevent datagram is at most a few KiB (UEVENT_BUFFER_SIZE is 2048 in the kernel)
MAX_DATAGRAM = 1 << 16


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
        from pyroute2.netlink.uevent import MarshalUevent

        self.reactor = reactor
        self.on_device = on_device
        self.on_overflow = on_overflow
        self.marshal = MarshalUevent()
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                  | socket.SOCK_NONBLOCK, NETLINK_KOBJECT_UEVENT)
        try:
            self.sock.bind((0, KERNEL_GROUP))
            try:  # room for a storm; needs CAP_NET_ADMIN (root has it)
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
            except OSError:
                pass
        except OSError:
            self.sock.close()
            raise
        self.fd = self.sock.fileno()
        reactor.add(self.fd, IN, self._read)

    def _read(self, _mask: int) -> None:
        for _ in range(BURST):
            try:
                data, (sender, _groups) = self.sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    log.warning("uevent buffer overflowed: events lost; resyncing VM devices")
                    self.on_overflow()
                    continue
                if exc.errno == errno.EINTR:
                    continue
                raise
            if sender != 0:
                continue  # only the kernel speaks on this group
            self._message(data)

    def _message(self, data: bytes) -> None:
        try:
            msgs = list(self.marshal.parse(data))
        except Exception:
            return  # not a uevent we understand
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
