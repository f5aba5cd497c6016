"""fanotify mount notifications and inotify, through libc (ctypes).

Only what the resident service needs: a non-blocking fanotify fd that reports mounts
attached to / detached from one mount namespace (``FAN_REPORT_MNT`` +
``FAN_MARK_MNTNS``, kernel 6.15+), and a non-blocking inotify fd with its event
parser.  Both raise ``OSError`` with the real errno; a kernel without mount
notifications gives EINVAL (unknown flag) or ENOSYS, which the caller treats as
"use the POLLPRI fallback".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# fanotify (include/uapi/linux/fanotify.h)
FAN_CLOEXEC = 0x00000001
FAN_NONBLOCK = 0x00000002
FAN_REPORT_MNT = 0x00004000
FAN_MARK_ADD = 0x00000001
FAN_MARK_MNTNS = 0x00000110
FAN_MNT_ATTACH = 0x01000000
FAN_MNT_DETACH = 0x02000000
FAN_Q_OVERFLOW = 0x00004000
FAN_EVENT_INFO_TYPE_MNT = 7

# inotify (include/uapi/linux/inotify.h)
IN_CLOEXEC = os.O_CLOEXEC
IN_NONBLOCK = os.O_NONBLOCK
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000

_fanotify_init = _libc.fanotify_init
_fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_fanotify_init.restype = ctypes.c_int
_fanotify_mark = _libc.fanotify_mark
_fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                           ctypes.c_char_p]
_fanotify_mark.restype = ctypes.c_int
_inotify_init1 = _libc.inotify_init1
_inotify_init1.argtypes = [ctypes.c_int]
_inotify_init1.restype = ctypes.c_int
_inotify_add_watch = _libc.inotify_add_watch
_inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_inotify_add_watch.restype = ctypes.c_int
_inotify_rm_watch = _libc.inotify_rm_watch
_inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
_inotify_rm_watch.restype = ctypes.c_int


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def mount_events_fd(nsfd: int) -> int:
    """A non-blocking fanotify fd reporting FAN_MNT_ATTACH/DETACH in the mount
    namespace ``nsfd`` (an fd of ``/proc/.../ns/mnt``)."""
    fd = _check(_fanotify_init(FAN_REPORT_MNT | FAN_CLOEXEC | FAN_NONBLOCK, os.O_RDONLY),
                "fanotify_init")
    try:
        _check(_fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_MNTNS,
                              FAN_MNT_ATTACH | FAN_MNT_DETACH, nsfd, None), "fanotify_mark")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class MountEvent:
    mask: int
    mnt_id: int | None  # the 64-bit unique mount id (statmount/STATX_MNT_ID_UNIQUE)

    @property
    def kind(self) -> str:
        if self.mask & FAN_Q_OVERFLOW:
            return "overflow"
        if self.mask & FAN_MNT_ATTACH:
            return "attach"
        if self.mask & FAN_MNT_DETACH:
            return "detach"
        return "other"


_META = struct.Struct("=IBBHQii")  # event_len, vers, reserved, metadata_len, mask, fd, pid


def parse_mount_events(buf: bytes) -> Iterator[MountEvent]:
    """Events of one ``read`` of a FAN_REPORT_MNT fanotify fd (malformed tail ignored)."""
    off = 0
    while off + _META.size <= len(buf):
        ev_len, _vers, _res, meta_len, mask, fd, _pid = _META.unpack_from(buf, off)
        if ev_len < _META.size or off + ev_len > len(buf):
            return
        if fd >= 0:  # never with FAN_REPORT_MNT; close anything we are handed
            os.close(fd)
        mnt_id = None
        info = off + meta_len
        while info + 4 <= off + ev_len:
            itype, _pad, ilen = struct.unpack_from("=BBH", buf, info)
            if ilen < 4:
                break
            if itype == FAN_EVENT_INFO_TYPE_MNT and ilen >= 16:
                (mnt_id,) = struct.unpack_from("=Q", buf, info + 8)
            info += ilen
        yield MountEvent(mask, mnt_id)
        off += ev_len


def inotify_fd() -> int:
    return _check(_inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")


def add_watch(fd: int, path: str, mask: int) -> int:
    return _check(_inotify_add_watch(fd, os.fsencode(path), mask), f"inotify_add_watch {path}")


def rm_watch(fd: int, wd: int) -> None:
    _inotify_rm_watch(fd, wd)


@dataclass(frozen=True)
class InotifyEvent:
    wd: int
    mask: int
    name: str


_IN = struct.Struct("=iIII")


def parse_inotify(buf: bytes) -> Iterator[InotifyEvent]:
    off = 0
    while off + _IN.size <= len(buf):
        wd, mask, _cookie, nlen = _IN.unpack_from(buf, off)
        raw = buf[off + _IN.size: off + _IN.size + nlen]
        yield InotifyEvent(wd, mask, os.fsdecode(raw.split(b"\0", 1)[0]))
        off += _IN.size + nlen
